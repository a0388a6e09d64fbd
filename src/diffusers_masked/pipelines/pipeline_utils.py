"""What every diffusers-masked pipeline shares: a saved folder that ``DiffusionPipeline.from_pretrained`` loads from a
folder or a Hub repo id, a model card, and ``push_to_hub``.

diffusers resolves classes inside ``diffusers`` and ``transformers`` only. Its mechanism for anything else is a module
file in the saved folder, named in ``model_index.json``: ``"_class_name": [module, class]`` with ``module.py`` at the
top for the pipeline, and ``"transformer": [module, class]`` with ``transformer/module.py`` for a component. Loading
imports those files, which is what ``trust_remote_code=True`` allows. Our ``save_pretrained`` writes each of them as a
*shim* of one import line from the installed ``diffusers_masked`` package, so a folder or repo holds no model code::

    pipe = DiffusionPipeline.from_pretrained("org/maskdit", trust_remote_code=True)
    pipe = MaskDiTPipeline.from_pretrained("org/maskdit")  # no flag: every code file is checked to be our shim

Without the flag, :meth:`MaskedDiffusionPipeline.from_pretrained` passes ``trust_remote_code=True`` on only after
checking every module the load would import: ``_class_name`` and each component entry must name diffusers,
transformers or exactly one of our shims, and the folder (or the repo, at the one commit that is then loaded) may hold
no other code file.

The sampling loop is shared too (:class:`MaskedDiffusionPipeline`): class labels in any int-like shape, the scheduler
check (a transformer trained in one parameterisation samples noise with a scheduler of another), guidance, diffusers'
``callback_on_step_end`` and the check that the result is finite.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import keyword
import math
import numbers
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES
from diffusers.schedulers import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import EvalResult, HfApi, ModelCard

# A folder saved by diffusers-masked 0.1 names our components by their module path, which diffusers resolves only
# among modules already imported (it imports nothing a repository names). Importing them here keeps such folders
# loading wherever a pipeline class of ours is imported.
from ..models import masked_dit  # noqa: F401
from ..schedulers import masked_training, scheduling_edm_heun  # noqa: F401
from ..utils.safe_loading import check_path_or_hub_id, read_json
from ..version import __version__
from .hub import build_model_card, check_extra_files, upload_saved

PROJECT_URL = "https://pypi.org/project/diffusers-masked/"
MODEL_CARD_TAGS = ["masked-diffusion", "diffusers-masked"]
# How many label names an error about an unknown one lists: enough to show the naming, not ImageNet's thousand.
MAX_LABELS_SHOWN = 20
# The subpackages a shim may import from; a shim named `name` imports `diffusers_masked.<subpackage>.<name>`.
SHIM_SUBPACKAGES = ("pipelines", "models", "schedulers")
CODE_SUFFIXES = (".py", ".pyc", ".so", ".pyd")


def read_model_index(path: str | os.PathLike) -> dict:
    """The parsed `model_index.json` at `path`.

    Raises:
        ValueError: naming the file, if it is missing, is not JSON or does not hold a JSON object.
    """
    index = read_json(path, hint="a saved pipeline's model_index.json is the JSON object save_pretrained writes")
    if not isinstance(index, dict):
        raise ValueError(f"{path} is not a pipeline index: expected a JSON object, got a {type(index).__name__}")
    return index


def check_positive_int(name: str, value) -> int:
    """`value` as an `int`; anything but an integer >= 1 (a bool, a float) raises a `ValueError` naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def check_guidance_scale(guidance_scale) -> float:
    """`guidance_scale` as a `float`, refusing anything but a finite number >= 0: inf turns every image into NaN, and
    NaN would silently switch guidance off."""
    if (
        isinstance(guidance_scale, bool)
        or not isinstance(guidance_scale, numbers.Real)
        or not math.isfinite(guidance_scale)
        or guidance_scale < 0
    ):
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    return float(guidance_scale)


def class_label_ids(class_labels, num_classes: int, label_ids: dict[str, int] | None = None) -> list[int]:
    """Class ids from `class_labels` in any int-like shape that flattens to the batch, as diffusers' `DiTPipeline`
    and its tests batch them: an id, a label name, a list or tuple of them (nested: `[[1], [1]]`), a `torch.Tensor`
    or numpy array of integers of any shape (`(B,)`, `(B, 1)`), numpy integer scalars.

    Args:
        class_labels: The labels, one per image, flattened in row-major order.
        num_classes (`int`): Ids must be in `[0, num_classes)`.
        label_ids (`dict[str, int]`, *optional*): Label names and their ids; without it a name is refused.

    Returns:
        `list[int]`: The ids.

    Raises:
        TypeError: An entry is neither an integer nor a label name (a float, a bool, ...).
        ValueError: An id is out of range, names are unknown, or there is no label at all.
    """
    allowed = f"int ids in [0, {num_classes})" + (" or label names (id2label)" if label_ids else "")
    ids, unknown = [], []

    def add(label):
        if hasattr(label, "tolist"):  # a tensor, a numpy array or scalar: now Python ints, floats or bools
            label = label.tolist()
        if isinstance(label, (list, tuple)):
            for item in label:
                add(item)
        elif isinstance(label, str) and label_ids:
            if label in label_ids:
                ids.append(label_ids[label])
            else:
                unknown.append(label)
        elif isinstance(label, int) and not isinstance(label, bool):
            if not 0 <= label < num_classes:
                raise ValueError(f"class label {label} is out of range: class_labels must be {allowed}")
            ids.append(label)
        else:
            raise TypeError(f"class_labels must be {allowed}, got {label!r} ({type(label).__name__})")

    add(class_labels)
    if unknown:
        known = sorted(label_ids)
        shown = ", ".join(map(repr, known[:MAX_LABELS_SHOWN]))
        if len(known) > MAX_LABELS_SHOWN:
            shown += f", ... ({len(known)} in all)"
        raise ValueError(f"unknown label names {unknown}; known labels: {shown}")
    if not ids:
        raise ValueError(f"class_labels must not be empty: give one of {allowed} per image")
    return ids


def shim_source(module: str, class_name: str) -> str:
    """The exact text of the shim that lets diffusers import `class_name` from the installed module `module`."""
    return (
        "# Written by diffusers-masked (pip install diffusers-masked). It holds no model code: it only lets\n"
        "# diffusers' from_pretrained find the installed class.\n"
        f"from {module} import {class_name}  # noqa: F401\n"
    )


def own_shim_source(name: str, class_name: str) -> str | None:
    """The shim text for `name`/`class_name` if `diffusers_masked.<subpackage>.<name>` defines that class, else `None`.

    Only our own installed modules are imported to answer this, never a file of the folder being checked."""
    if not (
        isinstance(name, str) and isinstance(class_name, str) and name.isidentifier() and class_name.isidentifier()
    ):
        return None
    if keyword.iskeyword(name):
        return None
    for subpackage in SHIM_SUBPACKAGES:
        module_name = f"diffusers_masked.{subpackage}.{name}"
        if importlib.util.find_spec(module_name) is None:
            continue
        defined = getattr(importlib.import_module(module_name), class_name, None)
        if isinstance(defined, type) and defined.__module__ == module_name:
            return shim_source(module_name, class_name)
    return None


def foreign_code(index: dict, code_files: list[str], read) -> list[str]:
    """What in a saved pipeline would make `from_pretrained` import code other than our shims.

    Args:
        index (`dict`): The parsed `model_index.json`.
        code_files (`list[str]`): Every code file in the folder or repo, as `/`-separated relative paths.
        read (`Callable[[str], str]`): Returns the text of one of `code_files`.

    Returns:
        `list[str]`: One line per problem; empty when loading imports only diffusers, transformers and our shims.
    """
    problems, checked = [], set()

    def check_shim(path: str, name: str, class_name: str, what: str):
        expected = own_shim_source(name, class_name)
        if expected is None:
            problems.append(f"{what} names [{name!r}, {class_name!r}], which is not a diffusers-masked class")
        elif path not in code_files:
            # diffusers would look the name up elsewhere (for a pipeline: as a community pipeline it downloads).
            problems.append(f"{what} names the module {name!r} but {path} is missing")
        elif read(path) != expected:
            problems.append(f"{path} is not the diffusers-masked shim")
        else:
            checked.add(path)

    class_name = index.get("_class_name")
    if isinstance(class_name, (list, tuple)):
        if len(class_name) != 2:
            problems.append(f"_class_name must be [module, class], got {class_name!r}")
        else:
            check_shim(f"{class_name[0]}.py", *class_name, "_class_name")
    elif not isinstance(class_name, str):
        problems.append(f"_class_name must be a string or [module, class], got {class_name!r}")

    for component, entry in index.items():
        if component.startswith("_") or not isinstance(entry, (list, tuple)):
            continue
        if len(entry) != 2:
            problems.append(f"{component!r} must be [library, class], got {entry!r}")
            continue
        library, component_class = entry
        if library is None:
            continue
        path = f"{component}/{library}.py"
        if path in code_files or not isinstance(library, str):
            check_shim(path, library, component_class, f"{component!r}")
        elif library not in LOADABLE_CLASSES and not library.startswith("diffusers_masked."):
            # diffusers resolves those two kinds without importing anything from the folder; a folder saved by
            # diffusers-masked 0.1 names its components by their full module path, which diffusers finds already
            # imported (see below).
            problems.append(f"{component!r} names the module {library!r}, which is neither diffusers' nor ours")

    problems += [
        f"{path} is a code file that is not a diffusers-masked shim" for path in code_files if path not in checked
    ]
    return problems


class MaskedDiffusionPipeline(DiffusionPipeline):
    """Base of the diffusers-masked pipelines (not used directly).

    Subclasses set ``_shim_module`` (the module under ``diffusers_masked.pipelines`` defining them),
    ``_model_card_tags``, ``_paper`` (the method's paper, cited in the model card) and the scheduler family:
    [`~MaskedDiffusionPipeline.compatible_schedulers`], ``_scheduler_requirement`` (why) and ``_scheduler_fix`` (what
    to do instead).
    """

    _shim_module: str = ""
    _model_card_tags: list[str] = []
    _paper: str = ""
    _scheduler_requirement: str = ""
    _scheduler_fix: str = ""
    # The tensors `callback_on_step_end` may read and replace, as in diffusers.
    _callback_tensor_inputs = ["latents"]

    @property
    def num_classes(self) -> int:
        """The number of classes the transformer is conditioned on (0: unconditional)."""
        return self.transformer.config.num_classes

    # ------------------------------------------------------------------ schedulers

    @classmethod
    def compatible_schedulers(cls) -> tuple[type[SchedulerMixin], ...]:
        """The scheduler classes (with their subclasses) that sample correctly from this pipeline's transformer."""
        raise NotImplementedError(f"{cls.__name__} does not say which schedulers it samples with")

    @classmethod
    def is_compatible_scheduler(cls, scheduler: SchedulerMixin | type[SchedulerMixin]) -> bool:
        """Whether `scheduler` (an instance or a class) is one of
        [`~MaskedDiffusionPipeline.compatible_schedulers`]."""
        scheduler_class = scheduler if isinstance(scheduler, type) else type(scheduler)
        return issubclass(scheduler_class, cls.compatible_schedulers())

    @classmethod
    def check_scheduler(cls, scheduler: SchedulerMixin | type[SchedulerMixin]) -> None:
        """Refuse a scheduler of another parameterisation than the transformer's, which would sample noise silently.

        Raises:
            ValueError: naming the scheduler given and the compatible ones.
        """
        if cls.is_compatible_scheduler(scheduler):
            return
        given = scheduler.__name__ if isinstance(scheduler, type) else type(scheduler).__name__
        compatible = ", ".join(c.__name__ for c in cls.compatible_schedulers())
        raise ValueError(
            f"{cls.__name__} cannot sample with {given}: {cls._scheduler_requirement} Compatible schedulers: "
            f"{compatible} (and their subclasses). {cls._scheduler_fix}"
        )

    def __setattr__(self, name, value):
        # Every way a scheduler enters a pipeline ends here: the constructor and from_pretrained (through
        # register_modules, also for a model_index.json naming another scheduler) and a swap such as
        # `pipe.scheduler = DDIMScheduler.from_config(...)`. Refusing it here points at the line that made the mistake
        # and leaves the pipeline as it was, where a check in __call__ would only fire at the next sampling.
        if name == "scheduler":
            self.check_scheduler(value)
        super().__setattr__(name, value)

    # ------------------------------------------------------------------ sampling, shared by the pipelines

    def _check_callback(self, callback_on_step_end, callback_on_step_end_tensor_inputs) -> list[str]:
        """Check the callback arguments as diffusers' `check_inputs` does; return the names of the tensors the
        callback gets (a [`~diffusers.callbacks.PipelineCallback`] names its own)."""
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError(
                "callback_on_step_end must be a function callback_on_step_end(pipe, step_index, timestep, "
                f"callback_kwargs) -> dict, or None; got {callback_on_step_end!r}"
            )
        if isinstance(callback_on_step_end_tensor_inputs, str) or not isinstance(
            callback_on_step_end_tensor_inputs, (list, tuple)
        ):
            raise ValueError(
                f"callback_on_step_end_tensor_inputs must be a list of names from {self._callback_tensor_inputs}, "
                f"got {callback_on_step_end_tensor_inputs!r}"
            )
        unknown = [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs must be names from {self._callback_tensor_inputs}, got {unknown}"
            )
        return list(callback_on_step_end_tensor_inputs)

    @staticmethod
    def _check_generator(generator, batch_size: int) -> None:
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"got {len(generator)} generators for a batch of {batch_size} images (after num_images_per_prompt); "
                "pass one generator per image, or a single one"
            )

    def prepare_latents(self, shape: tuple[int, ...], dtype, device, generator, latents=None) -> torch.Tensor:
        """The starting noise: standard-normal of `shape`, drawn from `generator` or the `latents` given (checked
        against `shape`), scaled by the scheduler's `init_noise_sigma`."""
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif not isinstance(latents, torch.Tensor) or tuple(latents.shape) != tuple(shape):
            found = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(
                f"latents must be a tensor of shape {shape} (batch, channels, height, width), got {found}"
            )
        return latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

    def _denoise(
        self,
        latents: torch.Tensor,
        class_labels: torch.Tensor | None,
        guidance_scale: float | None,
        num_inference_steps: int,
        step_kwargs: dict,
        callback_on_step_end,
        callback_tensor_inputs: Sequence[str],
        text: tuple | None = None,
    ) -> torch.Tensor:
        """The sampling loop: per scheduler timestep the transformer's prediction, guided as
        `uncond + guidance_scale * (cond - uncond)` when `guidance_scale` is not `None` (the unconditional branch
        with the null class `num_classes` and, for text, the negative prompt's embeddings), the scheduler's step and
        the callback, which may replace the latents. `text` is ``(embeds, mask, negative_embeds, negative_mask)``."""
        device = latents.device
        guided = guidance_scale is not None
        model_labels = class_labels
        if guided and class_labels is not None:
            model_labels = torch.cat([class_labels, torch.full_like(class_labels, self.num_classes)])
        text_kwargs = {}
        if text is not None:
            embeds, mask, negative_embeds, negative_mask = text
            if guided:
                embeds, mask = torch.cat([embeds, negative_embeds]), torch.cat([mask, negative_mask])
            text_kwargs = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
        label_kwargs = {"class_labels": model_labels} if model_labels is not None else {}
        channels = self.transformer.config.in_channels
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for step_index, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = torch.cat([latents, latents]) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            timestep = torch.as_tensor(t, device=device).expand(model_input.shape[0])
            output = self.transformer(model_input, timestep, **label_kwargs, **text_kwargs).sample
            # A model that also predicts a variance (DiT's learned sigma) guides and steps on its first channels.
            output = output[:, :channels]
            if guided:
                cond, uncond = output.chunk(2)
                output = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(output, t, latents, **step_kwargs).prev_sample
            if callback_on_step_end is not None:
                tensors = {"latents": latents}
                outputs = callback_on_step_end(
                    self, step_index, t, {name: tensors[name] for name in callback_tensor_inputs}
                )
                if not isinstance(outputs, dict):
                    raise TypeError(
                        "callback_on_step_end must return a dict (the callback_kwargs it was given, with any tensor "
                        f"it replaces), got {type(outputs).__name__}"
                    )
                replaced = outputs.pop("latents", latents)
                if tuple(replaced.shape) != tuple(latents.shape):
                    raise ValueError(
                        f"callback_on_step_end returned latents of shape {tuple(replaced.shape)} at step "
                        f"{step_index}; they must keep the shape {tuple(latents.shape)}"
                    )
                latents = replaced
        return latents

    def _check_finite(
        self, latents: torch.Tensor, guidance_scale: float | None, given_latents=None, callback_on_step_end=None
    ) -> None:
        """Refuse NaN or inf in the final latents (one read of the device per call), naming the likely cause.

        Raises:
            FloatingPointError: the latents hold NaN or inf.
        """
        finite = torch.isfinite(latents)
        if bool(finite.all()):
            return
        dtype = self.transformer.dtype
        causes = []
        if given_latents is not None and not bool(torch.isfinite(given_latents).all()):
            causes.append("the latents passed in hold NaN or inf")
        if guidance_scale is not None:
            if guidance_scale > torch.finfo(dtype).max:
                causes.append(
                    f"guidance_scale={guidance_scale!r} is beyond the largest {dtype} ({torch.finfo(dtype).max:.3g}), "
                    "so uncond + guidance_scale * (cond - uncond) is inf or NaN; usual values are 1 to 10"
                )
            else:
                causes.append(
                    f"guidance_scale={guidance_scale!r} may be too large: the guided prediction grows with it until "
                    f"it overflows {dtype}; usual values are 1 to 10"
                )
        if callback_on_step_end is not None:
            causes.append("callback_on_step_end may have returned NaN or inf latents")
        causes.append(
            f"the transformer's prediction: NaN or inf in its weights, or an overflow in {dtype} (float16 overflows "
            "above 65504; try bfloat16 or float32)"
        )
        raise FloatingPointError(
            f"{type(self).__name__} produced NaN or inf in {int((~finite).sum())} of {latents.numel()} values of "
            "its final latents. Likely cause: " + "; else ".join(causes) + "."
        )

    # ------------------------------------------------------------------ saving and loading

    def save_pretrained(self, save_directory: str | os.PathLike, model_card: ModelCard | None = None, **kwargs):
        """Save like `DiffusionPipeline.save_pretrained`, plus the loader shims and a model card (`README.md`).

        Args:
            save_directory (`str` or `os.PathLike`): Target folder.
            model_card (`huggingface_hub.ModelCard`, *optional*): Card to write; by default a card from
                [`~MaskedDiffusionPipeline.create_model_card`] is written unless the folder already has a `README.md`.
            kwargs: Passed to `DiffusionPipeline.save_pretrained` (`safe_serialization`, `variant`, ...);
                `push_to_hub=True` is not supported here, use [`~MaskedDiffusionPipeline.push_to_hub`].
        """
        if kwargs.pop("push_to_hub", False):
            raise ValueError(
                "push_to_hub=True is not supported by save_pretrained; call pipeline.push_to_hub(repo_id)"
            )
        super().save_pretrained(save_directory, **kwargs)
        folder = Path(save_directory)
        class_name = self.__class__.__name__
        (folder / f"{self._shim_module}.py").write_text(shim_source(type(self).__module__, class_name))
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = [self._shim_module, class_name]
        for component, entry in index.items():
            # diffusers records a class of ours under its module path, which it would only find already imported;
            # a shim in the component's folder makes it load in any process, from a folder or the Hub.
            if (
                not component.startswith("_")
                and isinstance(entry, list)
                and str(entry[0]).startswith("diffusers_masked.")
            ):
                module, component_class = entry
                name = module.rsplit(".", 1)[1]
                (folder / component / f"{name}.py").write_text(shim_source(module, component_class))
                index[component] = [name, component_class]
        index["_diffusers_masked_version"] = __version__
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if model_card is not None:
            model_card.save(folder / "README.md")
        elif not (folder / "README.md").exists():
            self.create_model_card().save(folder / "README.md")

    @classmethod
    def _check_code(cls, pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs) -> tuple[list[str], dict]:
        """Check a folder or Hub repo with [`foreign_code`] before anything of it is imported.

        Returns:
            `tuple[list[str], dict]`: the problems, and the `from_pretrained` arguments that load exactly what was
            checked (for a repo, the commit it was checked at).
        """
        path = str(pretrained_model_name_or_path)
        if os.path.isdir(path):
            root = Path(path)
            files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
            index = read_model_index(root / "model_index.json")
            code = [f for f in files if f.endswith(CODE_SUFFIXES)]
            return foreign_code(index, code, lambda f: (root / f).read_text()), {}

        from huggingface_hub import hf_hub_download, snapshot_download
        from huggingface_hub.constants import is_offline_mode

        common = {k: hub_kwargs[k] for k in ("cache_dir", "token") if k in hub_kwargs}
        if hub_kwargs.get("local_files_only") or is_offline_mode():
            # Only what is cached can be loaded: check the cached snapshot and load that folder.
            snapshot = snapshot_download(
                path, revision=hub_kwargs.get("revision"), local_files_only=True, allow_patterns=[], **common
            )
            problems, _ = cls._check_code(snapshot)
            return problems, {"pretrained_model_name_or_path": snapshot}
        info = HfApi(token=hub_kwargs.get("token")).model_info(path, revision=hub_kwargs.get("revision"))
        files = [s.rfilename for s in info.siblings or []]

        def download(filename: str) -> Path:
            return Path(hf_hub_download(path, filename, revision=info.sha, **common))

        index = read_model_index(download("model_index.json"))
        problems = foreign_code(
            index, [f for f in files if f.endswith(CODE_SUFFIXES)], lambda f: download(f).read_text()
        )
        # A commit is immutable: pinning it means diffusers imports exactly the files that were read here.
        return problems, {"revision": info.sha}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a saved pipeline folder or Hub repo with this class.

        Without `trust_remote_code`, every code file that loading could import is checked first (see
        [`foreign_code`]): when all of them are exactly the shims diffusers-masked writes, the load goes on with
        `trust_remote_code=True` (for a Hub repo, pinned to the commit that was checked); anything else raises a
        `ValueError` listing what was found. `trust_remote_code=True` skips the check and runs the repo's code, as
        with any custom pipeline: pass it only for a repo you trust.
        """
        check_path_or_hub_id(pretrained_model_name_or_path, "pretrained_model_name_or_path")
        if (
            cls is not MaskedDiffusionPipeline
            and "trust_remote_code" not in kwargs
            and "custom_pipeline" not in kwargs
        ):
            problems, pinned = cls._check_code(pretrained_model_name_or_path, **kwargs)
            if problems:
                raise ValueError(
                    f"{pretrained_model_name_or_path} holds code that diffusers-masked did not write, which loading "
                    "would run:\n  - " + "\n  - ".join(problems) + "\nInspect it, and pass trust_remote_code=True "
                    "only if you trust it (that runs the repo's code)."
                )
            pretrained_model_name_or_path = pinned.pop("pretrained_model_name_or_path", pretrained_model_name_or_path)
            kwargs = {**kwargs, **pinned, "trust_remote_code": True}
        pipeline = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if cls is not MaskedDiffusionPipeline and not isinstance(pipeline, cls):
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {type(pipeline).__name__}, not a {cls.__name__}"
            )
        return pipeline

    # ------------------------------------------------------------------ model card and Hub

    def create_model_card(
        self,
        repo_id: str | None = None,
        training_config: dict | None = None,
        eval_results: list[EvalResult] | None = None,
        dataset_name: str | None = None,
        sample_image: str | None = None,
        license: str = "apache-2.0",
    ) -> ModelCard:
        """A model card with `library_name: diffusers`, the diffusers-masked tags, how to load the pipeline,
        the model and scheduler configs, the training config and the evaluation results (as card metadata
        `model-index` and as a table).

        An unconditional model gets the Hub task `pipeline_tag: unconditional-image-generation`. The Hub has no task
        for class-conditional generation (diffusers' own `facebook/DiT-XL-2-256` sets none), so a class-conditional
        model gets no `pipeline_tag` (the unconditional one would misfile it) and the tag `class-conditional`."""
        name = repo_id or self.__class__.__name__
        conditional = bool(self.num_classes)
        transformer = getattr(self, "transformer", None)
        use = (
            "```bash\npip install diffusers-masked\n```\n\n```python\n"
            "from diffusers import DiffusionPipeline\n\n"
            f'pipe = DiffusionPipeline.from_pretrained("{repo_id or "path/to/this/folder"}", trust_remote_code=True)\n'
            f"{self._usage_example()}\n```\n\n"
            "The repo holds no model code: its `.py` files are one-line imports from the installed `diffusers_masked` "
            "package, which `trust_remote_code=True` lets diffusers import. That flag runs whatever code a repo "
            "holds, so for a copy you do not trust, load with "
            f"`diffusers_masked.{self.__class__.__name__}.from_pretrained(...)` instead: without the flag it checks "
            "that those imports are all the code there is, and refuses anything else.\n"
        )
        return build_model_card(
            name,
            intro=f"A {self.__class__.__name__} trained with [diffusers-masked]({PROJECT_URL}), masked training of "
            f"diffusion transformers in the diffusers family. Method: {self._paper}.",
            use=use,
            tags=[*MODEL_CARD_TAGS, *self._model_card_tags],
            conditional=conditional,
            text=bool(getattr(self, "is_text_conditioned", False)),
            configs={
                "transformer": dict(transformer.config) if transformer is not None else None,
                "scheduler": dict(self.scheduler.config),
            },
            training_config=training_config,
            eval_results=eval_results,
            dataset_name=dataset_name,
            sample_image=sample_image,
            license=license,
        )

    def _usage_example(self) -> str:
        return "images = pipe().images"

    def push_to_hub(
        self,
        repo_id: str,
        model_card: ModelCard | None = None,
        training_config: dict | None = None,
        eval_results: list[EvalResult] | None = None,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        extra_files: dict[str, str | os.PathLike] | None = None,
    ):
        """Create (or reuse) the Hub repo `repo_id`, save the pipeline with its shim and a model card, upload.

        `extra_files` maps names in the repo to local files uploaded beside the pipeline (a training run's
        ``samples.png``, which its model card shows). Returns the `huggingface_hub` commit info of the upload.
        """
        extra_files = check_extra_files(extra_files)
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        card = model_card or self.create_model_card(
            repo_id, training_config=training_config, eval_results=eval_results
        )
        return upload_saved(
            api,
            repo_id,
            lambda folder: self.save_pretrained(folder, model_card=card, safe_serialization=safe_serialization),
            extra_files,
            commit_message=commit_message or f"Upload {self.__class__.__name__}",
            create_pr=create_pr,
        )
