"""A run from start to end: claim the output folder (one run per folder, its lineage checked), record the run's
config, and at the end the final checkpoint, the EMA pipeline with its samples, evaluation and model card, published
atomically and optionally pushed to the Hub.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..utils.io import commit_dir, fsync_dir, fsync_tree, move, staging_dir
from .checkpoints import (
    _run_id_of,
    check_checkpoint,
    check_model_config,
    list_checkpoints,
    new_run_id,
    resolve_resume,
    restore_checkpoint,
    save_checkpoint,
)
from .distributed import check_ranks_agree, raise_on_every_rank
from .ema import export_ema_model
from .models import ONLINE_DIR
from .validation import evaluate_on_digits

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"


@dataclass
class RunStart:
    """What `start_run` found.

    Args:
        lock: the output folder's lock; keep it referenced for the run's lifetime.
        resume_path (`Path`, *optional*): the checkpoint to resume, `None` for a new run.
        resumed_state (`dict`, *optional*): its training state (`read_training_state`).
        run_id (`str`): the run's lineage: the checkpoint's, or a new one.
    """

    lock: Any
    resume_path: Path | None
    resumed_state: dict | None
    run_id: str


def lock_output_dir(accelerator, output_dir: str | os.PathLike):
    """One run per output folder: the main process holds an exclusive `flock` on ``<output_dir>/.lock`` for the
    run's lifetime (keep the returned handle open). The kernel drops the lock when the process ends, however it
    ends, so a killed run's lock never blocks its resume. Every rank calls this.

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


def start_run(accelerator, output_dir, resume_from_checkpoint: str | None, use_ema: bool, sharded: bool) -> RunStart:
    """Claim `output_dir` for this run (`lock_output_dir`), find and check the checkpoint to resume before any work
    (nothing in it can run code: `check_checkpoint`), and refuse a folder holding another run's checkpoints
    (`check_lineage`). Every rank calls this."""
    lock = lock_output_dir(accelerator, output_dir)
    resume_path = resolve_resume(resume_from_checkpoint, output_dir)
    resumed_state = check_checkpoint(resume_path, ema=use_ema, sharded=sharded) if resume_path else None
    run_id = resumed_state["run_id"] if resumed_state else new_run_id()  # used by the main process only
    lineage_error = None
    if accelerator.is_main_process:
        lineage_error = check_lineage(output_dir, run_id, resuming=resumed_state is not None)
    raise_on_every_rank(accelerator, lineage_error)
    return RunStart(lock, resume_path, resumed_state, run_id)


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


def record_run(accelerator, output_dir: str | os.PathLike, run_id: str, model, config: dict) -> dict:
    """Write `config` to ``output_dir/training_config.json`` (main process) and return the training state that
    every checkpoint of the run carries: its lineage, the model config and the run config."""
    model_config = {k: v for k, v in accelerator.unwrap_model(model).config.items() if not k.startswith("_")}
    if accelerator.is_main_process:
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        (Path(output_dir) / "training_config.json").write_text(text)
    return {"run_id": run_id, "model_config": model_config, "run": config}


def publish_pipeline(pipeline, output_dir: str | os.PathLike, **save_kwargs) -> None:
    """`pipeline.save_pretrained(output_dir)` made atomic for its loaders: saved into a temporary folder and
    fsynced, then moved in with ``model_index.json`` (what makes a folder a pipeline) removed first and renamed in
    last, so that at every moment the folder is either no pipeline or the complete new one."""
    output_dir = Path(output_dir)
    staging = staging_dir(output_dir / "pipeline")
    try:
        pipeline.save_pretrained(staging, **save_kwargs)
        fsync_tree(staging)
        index = output_dir / "model_index.json"
        if index.exists():
            index.unlink()
            fsync_dir(output_dir)
        for entry in sorted(staging.iterdir()):
            if entry.name == index.name:
                continue
            target = output_dir / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            move(entry, target)
        fsync_dir(output_dir)
        move(staging / index.name, index)
        fsync_dir(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_run(
    pipeline,
    output_dir: str | os.PathLike,
    *,
    grid,
    training_config: dict,
    dataset_name: str,
    eval_results: list | None = None,
    online_model=None,
    repo_id: str | None = None,
    push_to_hub: bool = False,
    hub_token: str | None = None,
):
    """The run's result in `output_dir` (main process only): ``samples.png``, the online weights in ``online/``
    (if given: what a following fine-tuning starts from, see `load_start_model`), and the pipeline with its model
    card, published atomically (`publish_pipeline`); then optionally pushed to the Hub."""
    output_dir = Path(output_dir)
    grid.save(output_dir / "samples.png")
    if online_model is not None:
        staging = staging_dir(output_dir / ONLINE_DIR)
        online_model.save_pretrained(staging)
        commit_dir(staging, output_dir / ONLINE_DIR, replace=True)
    repo_id = repo_id or output_dir.name
    card = pipeline.create_model_card(
        repo_id,
        training_config=training_config,
        eval_results=eval_results or None,
        dataset_name=dataset_name,
        sample_image="samples.png",
    )
    publish_pipeline(pipeline, output_dir, model_card=card)
    logger.info(f"saved the EMA pipeline, samples.png and the model card to {output_dir}")
    if push_to_hub:
        pipeline.push_to_hub(
            repo_id, model_card=card, token=hub_token, extra_files={"samples.png": output_dir / "samples.png"}
        )


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
    eval_results, grid = None, None
    if digits_evaluation is not None:
        metrics, eval_results, grid = evaluate_on_digits(pipeline, output_dir, **digits_evaluation)
        accelerator.log(
            {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)},
            step=global_step if log_step is None else log_step,
        )
    publish_run(
        pipeline,
        output_dir,
        grid=grid if grid is not None else final_grid(pipeline),
        training_config=training_state["run"],
        dataset_name=dataset_name,
        eval_results=eval_results,
        online_model=online if save_online else None,
        repo_id=repo_id,
        push_to_hub=push_to_hub,
        hub_token=hub_token,
    )
