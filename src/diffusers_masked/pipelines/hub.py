"""What every pipeline a diffusers-masked run publishes shares with the Hub, ours or diffusers' own: the model card
(metadata, use, evaluation, the training recipe and flags, the components) and the upload of a saved folder with
extra files in one commit."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData


def check_extra_files(extra_files: dict | None) -> dict:
    """`push_to_hub`'s `extra_files`, checked before anything is uploaded: names relative inside the repo, local files
    that exist."""
    extra_files = dict(extra_files or {})
    for name, path in extra_files.items():
        if not isinstance(name, str) or not name or name.startswith("/") or ".." in Path(name).parts:
            raise ValueError(f"extra_files names must be relative paths inside the repo, got {name!r}")
        if not Path(path).is_file():
            raise ValueError(f"extra_files[{name!r}] = {str(path)!r} is not a file")
    return extra_files


def upload_saved(api: HfApi, repo_id: str, save, extra_files: dict, commit_message: str, create_pr: bool = False):
    """``save(folder)`` into a temporary folder, the `extra_files` copied beside, all uploaded to `repo_id` in one
    commit; returns the commit info."""
    with tempfile.TemporaryDirectory() as tmpdir:
        save(tmpdir)
        for name, path in extra_files.items():
            (Path(tmpdir) / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, Path(tmpdir) / name)
        return api.upload_folder(
            repo_id=repo_id, folder_path=tmpdir, commit_message=commit_message, create_pr=create_pr
        )


def build_model_card(
    name: str,
    *,
    intro: str,
    use: str,
    tags: list[str],
    conditional: bool,
    configs: dict,
    text: bool = False,
    training_config: dict | None = None,
    eval_results: list[EvalResult] | None = None,
    dataset_name: str | None = None,
    sample_image: str | None = None,
    license: str = "apache-2.0",
) -> ModelCard:
    """The model card every pipeline a diffusers-masked run publishes gets, ours or diffusers' own: metadata
    (`library_name: diffusers`, `tags`, the Hub task, the dataset, `model-index` from `eval_results`), then `intro`,
    the samples, the ``## Use`` section `use`, the evaluation table, the training recipe and flags (with what changed
    on resuming and the token routes, if any) and the components' configs. A `text`-conditioned pipeline gets the
    Hub task `text-to-image`; a class-conditional one none (the Hub has no class-conditional task); an unconditional
    one `unconditional-image-generation`."""
    kind = "text-to-image" if text else ("class-conditional" if conditional else "unconditional")
    card_data = ModelCardData(
        library_name="diffusers",
        license=license,
        tags=[*tags, kind],
        pipeline_tag="text-to-image" if text else (None if conditional else "unconditional-image-generation"),
        datasets=[dataset_name] if dataset_name and "/" in dataset_name else None,
        model_name=name if eval_results else None,
        eval_results=eval_results or None,
    )
    sections = [f"# {name}\n", intro + "\n"]
    if sample_image:
        sections.append(f"![samples]({sample_image})\n")
    sections.append("## Use\n\n" + use)
    if eval_results:
        rows = "\n".join(
            f"| {r.metric_name or r.metric_type} | {r.metric_value:.4g} | {r.dataset_name} |" for r in eval_results
        )
        sections.append(f"## Evaluation\n\n| metric | value | dataset |\n|---|---|---|\n{rows}\n")
    if training_config:
        sections.append(_training_section(training_config))
    sections.append(
        "## Components\n\n```json\n" + json.dumps(configs, indent=2, sort_keys=True, default=str) + "\n```\n"
    )
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(sections)
    return ModelCard(content)


def _training_section(training_config: dict) -> str:
    recipe = training_config.get("recipe")
    changed = training_config.get("resumed") or []
    routes = training_config.get("tread_routes")
    summary = (
        f"Recipe `{recipe}` (`--recipe {str(recipe).split('@')[0]}`), with the flags below.\n\n" if recipe else ""
    )
    if routes:
        summary += (
            f"Trained with token routing (TREAD, Krause et al. 2025), routes `{routes}`: in training only, a share of "
            "the tokens skipped the routed blocks; the saved model is the plain model and samples without routing."
            "\n\n"
        )
    if changed:
        summary += (
            "Changed on resuming: "
            + "; ".join(
                f"from step {entry['at_step']}: "
                + ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in entry["changed"].items())
                for entry in changed
            )
            + ".\n\n"
        )
    return (
        "## Training\n\n"
        + summary
        + "```json\n"
        + json.dumps(training_config, indent=2, sort_keys=True, default=str)
        + "\n```\n"
    )
