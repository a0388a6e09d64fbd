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
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import keyword
import os
import shutil
import tempfile
from pathlib import Path

from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

# A folder saved by diffusers-masked 0.1 names our components by their module path, which diffusers resolves only
# among modules already imported (it imports nothing a repository names). Importing them here keeps such folders
# loading wherever a pipeline class of ours is imported.
from ..models import masked_dit  # noqa: F401
from ..schedulers import masked_training, scheduling_edm_heun  # noqa: F401
from ..version import __version__

MODEL_CARD_TAGS = ["masked-diffusion", "diffusers-masked"]
# The subpackages a shim may import from; a shim named `name` imports `diffusers_masked.<subpackage>.<name>`.
SHIM_SUBPACKAGES = ("pipelines", "models", "schedulers")
CODE_SUFFIXES = (".py", ".pyc", ".so", ".pyd")


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

    Subclasses set ``_shim_module`` (the module under ``diffusers_masked.pipelines`` defining them) and
    ``_model_card_tags``.
    """

    _shim_module: str = ""
    _model_card_tags: list[str] = []
    _paper: str = ""

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
            index = json.loads((root / "model_index.json").read_text())
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

        def read(filename: str) -> str:
            return Path(hf_hub_download(path, filename, revision=info.sha, **common)).read_text()

        index = json.loads(read("model_index.json"))
        problems = foreign_code(index, [f for f in files if f.endswith(CODE_SUFFIXES)], read)
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
        `model-index` and as a table)."""
        name = repo_id or self.__class__.__name__
        card_data = ModelCardData(
            library_name="diffusers",
            license=license,
            tags=[*MODEL_CARD_TAGS, *self._model_card_tags],
            pipeline_tag="unconditional-image-generation",
            datasets=[dataset_name] if dataset_name and "/" in dataset_name else None,
            model_name=name if eval_results else None,
            eval_results=eval_results or None,
        )
        transformer = getattr(self, "transformer", None)
        configs = {
            "transformer": dict(transformer.config) if transformer is not None else None,
            "scheduler": dict(self.scheduler.config),
        }
        sections = [
            f"# {name}\n",
            f"A {self.__class__.__name__} trained with [diffusers-masked]({self._paper or 'https://pypi.org/project/diffusers-masked/'})"
            f" ({self.__class__.__name__.replace('Pipeline', '')}: masked training of a diffusion transformer).\n",
        ]
        if sample_image:
            sections.append(f"![samples]({sample_image})\n")
        sections.append(
            "## Use\n\n```bash\npip install diffusers-masked\n```\n\n```python\n"
            "from diffusers import DiffusionPipeline\n\n"
            f'pipe = DiffusionPipeline.from_pretrained("{repo_id or "path/to/this/folder"}", trust_remote_code=True)\n'
            f"{self._usage_example()}\n```\n\n"
            "The repo holds no model code: its `.py` files are one-line imports from the installed `diffusers_masked` "
            "package, which `trust_remote_code=True` lets diffusers import. That flag runs whatever code a repo "
            "holds, "
            "so for a copy you do not trust, load with "
            f"`diffusers_masked.{self.__class__.__name__}.from_pretrained(...)` instead: without the flag it checks "
            "that those imports are all the code there is, and refuses anything else.\n"
        )
        if eval_results:
            rows = "\n".join(
                f"| {r.metric_name or r.metric_type} | {r.metric_value:.4g} | {r.dataset_name} |" for r in eval_results
            )
            sections.append(f"## Evaluation\n\n| metric | value | dataset |\n|---|---|---|\n{rows}\n")
        if training_config:
            sections.append(
                "## Training\n\n```json\n"
                + json.dumps(training_config, indent=2, sort_keys=True, default=str)
                + "\n```\n"
            )
        sections.append(
            "## Components\n\n```json\n" + json.dumps(configs, indent=2, sort_keys=True, default=str) + "\n```\n"
        )
        content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(sections)
        return ModelCard(content)

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
        extra_files = dict(extra_files or {})
        for name, path in extra_files.items():
            if not isinstance(name, str) or not name or name.startswith("/") or ".." in Path(name).parts:
                raise ValueError(f"extra_files names must be relative paths inside the repo, got {name!r}")
            if not Path(path).is_file():
                raise ValueError(f"extra_files[{name!r}] = {str(path)!r} is not a file")
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        card = model_card or self.create_model_card(
            repo_id, training_config=training_config, eval_results=eval_results
        )
        with tempfile.TemporaryDirectory() as tmpdir:
            self.save_pretrained(tmpdir, model_card=card, safe_serialization=safe_serialization)
            for name, path in extra_files.items():
                (Path(tmpdir) / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, Path(tmpdir) / name)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=tmpdir,
                commit_message=commit_message or f"Upload {self.__class__.__name__}",
                create_pr=create_pr,
            )
