"""A run from start to end: claim the output folder (one run per folder; its lineage, contents and the resumed
checkpoint's settings checked before any work), record the run's config, and at the end the final checkpoint, the EMA
pipeline with its samples, evaluation and model card, published atomically and optionally pushed to the Hub.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..pipelines.stock import publisher
from ..utils.io import atomic_write_text, fsync_tree, staging_dir
from .checkpoints import (
    _run_id_of,
    check_checkpoint,
    check_model_config,
    check_resume,
    list_checkpoints,
    new_run_id,
    read_training_state,
    resolve_resume,
    restore_checkpoint,
    save_checkpoint,
)
from .distributed import check_ranks_agree, raise_on_every_rank
from .ema import export_ema_model
from .models import ONLINE_DIR
from .outputs import LOCK_FILE, check_output_folder, claim_output_folder, publish_files, read_manifest, record_outputs
from .validation import evaluate_on_digits

logger = logging.getLogger(__name__)

TRAINING_CONFIG_FILE = "training_config.json"
EVAL_RESULTS_FILE = "eval_results.json"


@dataclass
class RunStart:
    """What `start_run` found.

    Args:
        lock: the output folder's lock; keep it referenced for the run's lifetime.
        resume_path (`Path`, *optional*): the checkpoint to resume, `None` for a new run.
        resumed_state (`dict`, *optional*): its training state (`read_training_state`).
        run_id (`str`): the run's lineage: the checkpoint's, or a new one.
        changes (`dict`): the flags a resumed run changed (flag -> [recorded, now]), recorded by `record_run`.
    """

    lock: Any
    resume_path: Path | None
    resumed_state: dict | None
    run_id: str
    changes: dict = field(default_factory=dict)


def lock_output_dir(accelerator, output_dir: str | os.PathLike):
    """One run per output folder: the main process holds an exclusive `flock` on the folder's lock file
    (``.diffusers-masked.lock``) for the run's lifetime (keep the returned handle open). The kernel drops the lock
    when the process ends, however it ends, so a killed run's lock never blocks its resume. Every rank calls this.

    Raises:
        RuntimeError: on every rank, naming the process that holds the folder.
    """
    import fcntl

    output_dir = Path(output_dir)
    handle, message = None, None
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        handle = open(output_dir / LOCK_FILE, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            handle = None
            message = (
                f"{output_dir} is in use by another training run ({holder}); wait for it to end or choose another "
                "--output_dir"
            )
        else:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
    raise_on_every_rank(accelerator, message, RuntimeError)
    return handle


def check_lineage(output_dir: str | os.PathLike, run_id: str, resuming: bool) -> str | None:
    """Why this run may not use `output_dir` (`None` if it may): its checkpoints must all be this run's lineage,
    so that resuming and pruning never mix two runs."""
    foreign = [p.name for p in list_checkpoints(output_dir) if _run_id_of(p) != run_id]
    if not foreign:
        return None
    what = "this run resumes another run's checkpoint" if resuming else "this is a new run"
    return (
        f"{output_dir} holds checkpoints of another run "
        f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}) "
        f"and {what}: continue that run with --resume_from_checkpoint latest, choose another --output_dir, or delete "
        "the folder to start over"
    )


def start_run(
    accelerator,
    output_dir,
    resume_from_checkpoint: str | None,
    use_ema: bool,
    sharded: bool,
    *,
    config: dict | None = None,
    end: int | None = None,
    overwrite_output_dir: bool = False,
) -> RunStart:
    """Claim `output_dir` for this run and check, before any work, everything that could make it lose or mix up
    files. Every rank calls this.

    - one run per folder (`lock_output_dir`); `output_dir` must not be a file;
    - the checkpoint to resume is complete and nothing in it can run code (`check_checkpoint`);
    - the folder holds no other run's checkpoints (`check_lineage`), and no file this run did not write
      (`check_output_folder`; ``overwrite_output_dir`` lets it write beside them);
    - a resumed run's `config` (its flags as `run_config` records them) changes only what a resume may change, and
      its `end` (last step) is not before the checkpoint's step (`check_resume`).

    Raises:
        ValueError: on every rank, saying what is wrong and what to do.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {output_dir} is a file, not a folder: choose a folder for the run's outputs")
    lock = lock_output_dir(accelerator, output_dir)
    resume_path = resolve_resume(resume_from_checkpoint, output_dir)
    resumed_state = check_checkpoint(resume_path, ema=use_ema, sharded=sharded) if resume_path else None
    run_id = resumed_state["run_id"] if resumed_state else new_run_id()  # used by the main process only
    error, changes = None, {}
    if accelerator.is_main_process:
        resuming = resumed_state is not None
        error = check_lineage(output_dir, run_id, resuming) or check_output_folder(
            output_dir, run_id if resuming else None, overwrite_output_dir
        )
        if error is None and resuming and config is not None:
            changes, error = check_resume(resumed_state, config, end)
        if error is None:
            claim_output_folder(output_dir, run_id)
    raise_on_every_rank(accelerator, error)
    return RunStart(lock, resume_path, resumed_state, run_id, changes)


def run_finished(output_dir: str | os.PathLike, steps: int) -> bool:
    """A run in `output_dir` ended: its online weights are saved and its newest checkpoint is at step `steps` or
    later (what a following stage starts from)."""
    checkpoints = list_checkpoints(output_dir)
    return (
        (Path(output_dir) / ONLINE_DIR / "config.json").is_file()
        and bool(checkpoints)
        and read_training_state(checkpoints[-1])["global_step"] >= steps
    )


def start_trackers(accelerator, project: str, config: dict) -> None:
    """Start the run's trackers (main process) with the scalar entries of its recorded `config`."""
    if accelerator.is_main_process:
        scalars = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"}
        accelerator.init_trackers(project, config=scalars)


def resume_run(accelerator, run: RunStart, model, ema, sharded: bool, stage: str | None = None) -> int:
    """The step this run starts at: 0 for a new run; for a resumed one, its checkpoint's, after checking that the
    checkpoint was trained with this model's config (`check_model_config`) and restoring it
    (`restore_checkpoint`). Every rank calls this, after `prepare_training`."""
    if run.resume_path is None:
        return 0
    check_model_config(run.resumed_state["model_config"], accelerator.unwrap_model(model).config)
    global_step = restore_checkpoint(accelerator, run.resume_path, ema, sharded)["global_step"]
    logger.info(f"{stage + ': ' if stage else ''}resumed from {run.resume_path} at step {global_step}")
    return global_step


def record_run(accelerator, output_dir: str | os.PathLike, run: RunStart, model, config: dict, owned_dirs=()) -> dict:
    """Write `config` to ``output_dir/training_config.json`` (main process), with the flags a resumed run changed
    and from which step (``resumed``), and return the training state that every checkpoint of the run carries: its
    lineage, the model config and the run config.

    `owned_dirs` are folders inside `output_dir` that other libraries fill for this run (its TensorBoard logs, a
    latent cache): recorded as the run's, so that a resume finds them its own."""
    model_config = {k: v for k, v in accelerator.unwrap_model(model).config.items() if not k.startswith("_")}
    if run.resumed_state is not None:
        history = list((run.resumed_state.get("run") or {}).get("resumed", []))
        if run.changes:
            history.append({"at_step": run.resumed_state["global_step"], "changed": run.changes})
        config = {**config, "resumed": history}
    if accelerator.is_main_process:
        output_dir = Path(output_dir)
        atomic_write_text(output_dir / TRAINING_CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True, default=str))
        root = output_dir.resolve()
        # Folders given relative to the output folder, or inside it; one elsewhere is not the folder's business.
        owned = [(output_dir / d).resolve() for d in owned_dirs]
        inside = [d.relative_to(root) for d in owned if root in d.parents]
        record_outputs(output_dir, run.run_id, [TRAINING_CONFIG_FILE], dirs=inside)
    return {"run_id": run.run_id, "model_config": model_config, "run": config}


def publish_pipeline(pipeline, output_dir: str | os.PathLike, **save_kwargs) -> list[str]:
    """`pipeline.save_pretrained(output_dir)` made atomic for its loaders and safe for the folder's other files:
    saved into a staging folder and fsynced, then moved in file by file (`publish_files`), ``model_index.json``
    removed first and moved in last, so that at every moment the folder is either no pipeline or the complete new
    one. Returns the files written, relative to `output_dir`."""
    output_dir = Path(output_dir)
    staging = staging_dir(output_dir / "pipeline")
    try:
        pipeline.save_pretrained(staging, **save_kwargs)
        fsync_tree(staging)
        return publish_files(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_run(
    pipeline,
    output_dir: str | os.PathLike,
    run_id: str,
    *,
    grid,
    training_config: dict,
    dataset_name: str,
    eval_results: list | None = None,
    metrics: dict | None = None,
    online_model=None,
    repo_id: str | None = None,
    push_to_hub: bool = False,
    hub_token: str | None = None,
):
    """The run's result in `output_dir` (main process only): ``samples.png``, the evaluation's ``eval_results.json``
    (`metrics`), the online weights in ``online/`` (if given: what a following fine-tuning starts from, see
    `load_start_model`), and the pipeline with its model card, all staged, then moved in file by file with the
    pipeline's ``model_index.json`` last (`publish_files`); files this run's lineage published before and no longer
    writes are removed, nothing else is touched. Then optionally pushed to the Hub."""
    output_dir = Path(output_dir)
    repo_id = repo_id or output_dir.resolve().name
    pipeline = publisher(pipeline)  # a stock diffusers pipeline is saved as it is, with our card beside it
    card = pipeline.create_model_card(
        repo_id,
        training_config=training_config,
        eval_results=eval_results or None,
        dataset_name=dataset_name,
        sample_image="samples.png",
    )
    manifest = read_manifest(output_dir)
    previous = [
        name
        for name in manifest["published"]
        if manifest["run_id"] == run_id
        and (output_dir / name).is_file()
        and manifest["files"].get(name) == _stamp_of(output_dir / name)
    ]
    staging = staging_dir(output_dir / "publish")
    try:
        grid.save(staging / "samples.png")
        if metrics is not None:
            (staging / EVAL_RESULTS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str))
        if online_model is not None:
            online_model.save_pretrained(staging / ONLINE_DIR)
        pipeline.save_pretrained(staging, model_card=card)
        fsync_tree(staging)
        files = publish_files(staging, output_dir, previous)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    record_outputs(output_dir, run_id, files, published=files)
    logger.info(f"saved the EMA pipeline, samples.png and the model card to {output_dir}")
    if push_to_hub:
        pipeline.push_to_hub(
            repo_id, model_card=card, token=hub_token, extra_files={"samples.png": output_dir / "samples.png"}
        )


def _stamp_of(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def finish_run(
    accelerator,
    model,
    ema,
    sharded: bool,
    output_dir: str | os.PathLike,
    global_step: int,
    training_state: dict,
    *,
    model_cls,
    checkpoints_total_limit: int | None,
    make_pipeline: Callable,
    final_grid: Callable,
    dataset_name: str,
    digits_evaluation: dict | None = None,
    save_online: bool = False,
    log_step: int | None = None,
    repo_id: str | None = None,
    push_to_hub: bool = False,
    hub_token: str | None = None,
):
    """The end of a run: the final checkpoint, a check that data-parallel ranks agree, the EMA weights gathered into
    ``make_pipeline(model)``, the optional digits evaluation (`evaluate_on_digits`), and `publish_run`. Every rank
    calls this; the main process writes.

    Args:
        model_cls (`type`): the model's class (`export_ema_model`).
        checkpoints_total_limit (`int`, *optional*): see `save_checkpoint`.
        make_pipeline (`Callable`): the pipeline around a final model.
        final_grid (`Callable`): ``samples.png`` from the pipeline, when the evaluation gives no grid of its samples.
        dataset_name (`str`): for the model card.
        digits_evaluation (`dict`, *optional*): `evaluate_on_digits`'s keyword arguments; its metrics are logged
            at `log_step` (defaults to `global_step`).
        save_online (`bool`, defaults to `False`): also save the trained (online) weights, what a following
            fine-tuning starts from.
        repo_id, push_to_hub, hub_token: see `publish_run`.
    """
    save_checkpoint(accelerator, output_dir, global_step, checkpoints_total_limit, training_state, ema, sharded)
    if not sharded:
        check_ranks_agree(accelerator, model)
    sharded_ema = ema if sharded else None
    if save_online:
        final_model, online = export_ema_model(accelerator, model, ema, model_cls, sharded_ema, return_online=True)
    else:
        final_model, online = export_ema_model(accelerator, model, ema, model_cls, sharded_ema), None
    if not accelerator.is_main_process:
        return
    pipeline = make_pipeline(final_model)
    metrics, eval_results, grid = None, None, None
    if digits_evaluation is not None:
        metrics, eval_results, grid = evaluate_on_digits(pipeline, **digits_evaluation)
        accelerator.log(
            {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)},
            step=global_step if log_step is None else log_step,
        )
    publish_run(
        pipeline,
        output_dir,
        training_state["run_id"],
        grid=grid if grid is not None else final_grid(pipeline),
        training_config=training_state["run"],
        dataset_name=dataset_name,
        eval_results=eval_results,
        metrics=metrics,
        online_model=online if save_online else None,
        repo_id=repo_id,
        push_to_hub=push_to_hub,
        hub_token=hub_token,
    )
