"""What every diffusers-masked pipeline shares: a saved folder that ``DiffusionPipeline.from_pretrained`` can load,
a model card, and ``push_to_hub``.

diffusers resolves a pipeline class by name inside the ``diffusers`` package, which knows nothing of third-party
pipelines. Its documented route for others is a custom-pipeline module in the saved folder, named in
``model_index.json`` as ``"_class_name": [module, class]`` and loaded with ``trust_remote_code=True``. Our
``save_pretrained`` writes such a module as a two-line *shim* that only imports the class from the installed
``diffusers_masked`` package, so a folder or Hub repo carries no model code of its own::

    pipe = DiffusionPipeline.from_pretrained("out/maskdit-digits", trust_remote_code=True)
    pipe = MaskDiTPipeline.from_pretrained("out/maskdit-digits")  # no flag: the shim is checked to be ours
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from diffusers import DiffusionPipeline
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

# diffusers 0.42 only loads a saved component whose module is already imported (importing a module named by a
# repository would run its code). Every module that defines a diffusers-masked component is imported here, so any
# pipeline module - and so the saved shim - makes all of them loadable.
from ..models import masked_dit  # noqa: F401
from ..schedulers import masked_training, scheduling_edm_heun  # noqa: F401
from ..version import __version__

MODEL_CARD_TAGS = ["masked-diffusion", "diffusers-masked"]


def shim_source(module_name: str, class_name: str) -> str:
    """The exact text of the custom-pipeline shim for ``class_name``."""
    return (
        "# Written by diffusers-masked (pip install diffusers-masked). It holds no model code: it only lets\n"
        "# DiffusionPipeline.from_pretrained(..., trust_remote_code=True) find the installed pipeline class.\n"
        f"from diffusers_masked.pipelines.{module_name} import {class_name}  # noqa: F401\n"
    )


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
        """Save like `DiffusionPipeline.save_pretrained`, plus the loader shim and a model card (`README.md`).

        Args:
            save_directory: Target folder.
            model_card (`huggingface_hub.ModelCard`, *optional*): Card to write; by default a card from
                :meth:`create_model_card` is written unless the folder already has a `README.md`.
            kwargs: Passed to `DiffusionPipeline.save_pretrained` (`safe_serialization`, `variant`, ...);
                `push_to_hub=True` is not supported here, use :meth:`push_to_hub`.
        """
        if kwargs.pop("push_to_hub", False):
            raise ValueError("push_to_hub=True is not supported by save_pretrained; call pipeline.push_to_hub(repo_id)")
        super().save_pretrained(save_directory, **kwargs)
        folder = Path(save_directory)
        class_name = self.__class__.__name__
        (folder / f"{self._shim_module}.py").write_text(shim_source(self._shim_module, class_name))
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = [self._shim_module, class_name]
        index["_diffusers_masked_version"] = __version__
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if model_card is not None:
            model_card.save(folder / "README.md")
        elif not (folder / "README.md").exists():
            self.create_model_card().save(folder / "README.md")

    @classmethod
    def _shim_is_ours(cls, pretrained_model_name_or_path, **hub_kwargs) -> bool:
        filename = f"{cls._shim_module}.py"
        if os.path.isdir(pretrained_model_name_or_path):
            path = os.path.join(pretrained_model_name_or_path, filename)
            if not os.path.isfile(path):
                return False
        else:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError

            try:
                path = hf_hub_download(pretrained_model_name_or_path, filename, **hub_kwargs)
            except EntryNotFoundError:
                return False
        return Path(path).read_text() == shim_source(cls._shim_module, cls.__name__)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a saved pipeline folder or Hub repo with this class.

        The folder's custom-pipeline shim is only *imported* (which is what diffusers' `trust_remote_code` guards)
        when its text is exactly the two lines diffusers-masked writes; anything else needs an explicit
        `trust_remote_code=True` from the caller, as with any custom pipeline.
        """
        if "trust_remote_code" not in kwargs and cls is not MaskedDiffusionPipeline:
            hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
            if cls._shim_is_ours(str(pretrained_model_name_or_path), **hub_kwargs):
                kwargs["trust_remote_code"] = True
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
            "`trust_remote_code=True` only lets diffusers import the pipeline class from the installed "
            f"`diffusers_masked` package (the repo's `{self._shim_module}.py` is a two-line import). "
            f"`diffusers_masked.{self.__class__.__name__}.from_pretrained(...)` loads it without the flag.\n"
        )
        if eval_results:
            rows = "\n".join(
                f"| {r.metric_name or r.metric_type} | {r.metric_value:.4g} | {r.dataset_name} |" for r in eval_results
            )
            sections.append(f"## Evaluation\n\n| metric | value | dataset |\n|---|---|---|\n{rows}\n")
        if training_config:
            sections.append(
                "## Training\n\n```json\n" + json.dumps(training_config, indent=2, sort_keys=True, default=str) + "\n```\n"
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
    ):
        """Create (or reuse) the Hub repo `repo_id`, save the pipeline with its shim and a model card, upload.

        Returns the `huggingface_hub` commit info of the upload.
        """
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        card = model_card or self.create_model_card(repo_id, training_config=training_config, eval_results=eval_results)
        with tempfile.TemporaryDirectory() as tmpdir:
            self.save_pretrained(tmpdir, model_card=card, safe_serialization=safe_serialization)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=tmpdir,
                commit_message=commit_message or f"Upload {self.__class__.__name__}",
                create_pr=create_pr,
            )
