"""Publishing diffusers' own pipelines (``DiTPipeline``, ``PixArtAlphaPipeline``) that our scripts train: the folder
``save_pretrained`` writes, untouched (only diffusers and transformers classes, no code files, so it loads with
``DiffusionPipeline.from_pretrained`` anywhere, without this package and without ``trust_remote_code``), plus the
model card our pipelines get, and ``push_to_hub`` of both with a run's sample grid.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard

from .hub import build_model_card, check_extra_files, upload_saved
from .pipeline_utils import PROJECT_URL, MaskedDiffusionPipeline

# What each stock pipeline's card says it was trained as, and how to call it.
STOCK_USAGE = {
    "DiTPipeline": (
        ["dit"],
        "images = pipe(class_labels=[0, 1, 2], num_inference_steps=50, guidance_scale=4.0).images",
    ),
    "PixArtAlphaPipeline": (["pixart"], 'images = pipe("a photo of a cat", use_resolution_binning=False).images'),
}


class StockPipelinePublisher:
    """`create_model_card`, `save_pretrained` (with the card) and `push_to_hub` for a stock diffusers pipeline,
    the three calls `publish_run` makes on a pipeline.

    Args:
        pipeline (`DiffusionPipeline`): the pipeline, one of diffusers' own.
        method (`str`): how it was trained, for the card's first lines (e.g. "DiT's DDPM objective").
    """

    def __init__(self, pipeline, method: str):
        self.pipeline = pipeline
        self.method = method

    @property
    def class_name(self) -> str:
        return type(self.pipeline).__name__

    def create_model_card(
        self,
        repo_id: str | None = None,
        training_config: dict | None = None,
        eval_results: list[EvalResult] | None = None,
        dataset_name: str | None = None,
        sample_image: str | None = None,
        license: str = "apache-2.0",
    ) -> ModelCard:
        tags, usage = STOCK_USAGE.get(self.class_name, ([], "images = pipe().images"))
        transformer = getattr(self.pipeline, "transformer", None)
        use = (
            "```python\nfrom diffusers import DiffusionPipeline\n\n"
            f'pipe = DiffusionPipeline.from_pretrained("{repo_id or "path/to/this/folder"}")\n{usage}\n```\n\n'
            f"This is a stock diffusers `{self.class_name}`: loading it needs neither diffusers-masked nor "
            "`trust_remote_code`.\n"
        )
        return build_model_card(
            repo_id or self.class_name,
            intro=f"A diffusers `{self.class_name}` trained with [diffusers-masked]({PROJECT_URL}) ({self.method}).",
            use=use,
            tags=["diffusers-masked", *tags],
            conditional=self.class_name == "DiTPipeline",
            text=self.class_name == "PixArtAlphaPipeline",
            configs={
                "transformer": dict(transformer.config) if transformer is not None else None,
                "scheduler": dict(self.pipeline.scheduler.config),
            },
            training_config=training_config,
            eval_results=eval_results,
            dataset_name=dataset_name,
            sample_image=sample_image,
            license=license,
        )

    def save_pretrained(self, save_directory: str | os.PathLike, model_card: ModelCard | None = None, **kwargs):
        """diffusers' `save_pretrained`, then the card as ``README.md`` (unless the folder has one and none is
        given)."""
        self.pipeline.save_pretrained(save_directory, **kwargs)
        readme = Path(save_directory) / "README.md"
        if model_card is not None or not readme.exists():
            (model_card or self.create_model_card()).save(readme)

    def push_to_hub(
        self,
        repo_id: str,
        model_card: ModelCard | None = None,
        token: str | None = None,
        private: bool | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
        extra_files: dict | None = None,
    ):
        """Create (or reuse) the Hub repo, upload the saved pipeline, its card and `extra_files` in one commit."""
        extra_files = check_extra_files(extra_files)
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        card = model_card or self.create_model_card(repo_id)
        return upload_saved(
            api,
            repo_id,
            lambda folder: self.save_pretrained(folder, model_card=card),
            extra_files,
            commit_message=commit_message or f"Upload {self.class_name}",
            create_pr=create_pr,
        )


def publisher(pipeline, method: str = "diffusers-masked's training scripts"):
    """What `publish_run` saves and pushes through: our pipelines themselves, a stock one through a
    [`StockPipelinePublisher`]."""
    if isinstance(pipeline, (MaskedDiffusionPipeline, StockPipelinePublisher)):
        return pipeline
    return StockPipelinePublisher(pipeline, method)
