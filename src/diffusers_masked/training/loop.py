"""The training loop: phases x steps, each optimizer step over gradient-accumulation micro-batches, with the
finite-loss check, clipping, the optimizer and EMA updates and logging; periodic checkpoints and validation grids.

What is computed on a micro-batch is not the loop's: a script passes its own ``training_step(batch, generator,
mask_ratio)`` (draw the mask, drop labels, call the objective), so the method is read in the script.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from .batches import StepBatchSampler, step_generator
from .checkpoints import save_checkpoint
from .ema import ema_weights
from .phases import Phase, learning_rate_at, set_learning_rate
from .validation import save_validation_grid


def periodic_saves(
    accelerator,
    model,
    ema,
    sharded: bool,
    output_dir: str | os.PathLike,
    training_state: dict,
    *,
    end: int,
    checkpointing_steps: int,
    checkpoints_total_limit: int | None,
    validation_steps: int,
    validation_grid: Callable,
    tag: str = "validation",
) -> Callable[[int], None]:
    """The `after_step` of `train_phases`: a checkpoint every `checkpointing_steps` steps before `end` (the final one
    is `finish_run`'s), and every `validation_steps` steps a grid from the EMA weights, ``validation_grid(model)``,
    saved by `save_validation_grid` under `tag`.

    Unsharded, only the main process samples. Under FSDP every rank must: each rank swaps its own EMA shards in, and
    all of them run the same sampling loop (same seed, same steps) so that their forwards' all-gathers pair up."""

    def after_step(step: int) -> None:
        if checkpointing_steps and step % checkpointing_steps == 0 and step < end:
            save_checkpoint(accelerator, output_dir, step, checkpoints_total_limit, training_state, ema, sharded)
        if validation_steps and step % validation_steps == 0 and (sharded or accelerator.is_main_process):
            with ema_weights(ema, accelerator.unwrap_model(model), sharded) as ema_model:
                grid = validation_grid(ema_model)
            save_validation_grid(accelerator, grid, output_dir, step, training_state["run_id"], tag=tag)

    return after_step


def optimizer_step(
    accelerator,
    model,
    optimizer,
    ema,
    batches: Iterator,
    training_step: Callable,
    generator: torch.Generator,
    mask_ratio: float,
    *,
    gradient_accumulation_steps: int = 1,
    max_grad_norm: float | None = None,
    log_keys: Sequence[str] = ("loss",),
    where: str = "",
) -> dict[str, float]:
    """One optimizer step as every training script takes it; returns the `log_keys` of the step's outputs, averaged
    over its micro-batches.

    Per micro-batch (`gradient_accumulation_steps` of them, drawn from `batches`): ``out = training_step(batch,
    generator, mask_ratio)`` under `accelerator.autocast`, a check that every rank's ``out.loss`` is finite, the
    backward pass, clipping to `max_grad_norm` and the optimizer (which accelerate applies on the last micro-batch);
    then the EMA update.

    Raises:
        FloatingPointError: on every rank, at the first non-finite loss (`where` says which step), before the
            optimizer takes it.
    """
    logs = dict.fromkeys(log_keys, 0.0)
    for _ in range(gradient_accumulation_steps):
        batch = next(batches)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                out = training_step(batch, generator, mask_ratio)
            finite = torch.isfinite(out.loss.detach()).float()
            if accelerator.gather(finite[None]).min() < 1:
                raise FloatingPointError(
                    f"non-finite loss{where} (mask ratio {mask_ratio:.3f}); nothing was saved after it - resume with "
                    "--resume_from_checkpoint latest after lowering --learning_rate or setting --max_grad_norm"
                )
            accelerator.backward(out.loss)
            if accelerator.sync_gradients and max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for key in logs:
            logs[key] += getattr(out, key).detach().float().item() / gradient_accumulation_steps
    if ema is not None:
        ema.step(model.parameters())
    return logs


def step_cost(phase: Phase, global_step: int) -> float:
    """A step's cost relative to others of the same run, for the remaining-time estimate: the batch times the share of
    tokens the encoder sees, ``batch * (1 - ratio)``, floored at a tenth of the batch for what runs over all tokens
    (embedding, decoder, optimizer). On the digits defaults an unmasked step takes 1.9x a ratio-0.5 one; this says
    2x."""
    return phase.batch_size * max(0.1, 1.0 - phase.ratio(global_step))


class RemainingTime:
    """The whole run's remaining training time, shown in the progress bar beside tqdm's own estimate (which assumes
    every step costs the same, so it is low while masked steps run before unmasked ones): the measured seconds per
    unit of `step_cost` (a running mean after the first step, which pays one-off costs) times the cost of every
    step left in every phase."""

    def __init__(self, phases: Sequence[Phase], global_step: int):
        self.phases = list(phases)
        self.units_left = sum(
            step_cost(phase, step) for phase in self.phases for step in range(max(global_step, phase.start), phase.end)
        )
        self.seconds = self.units = 0.0
        self.steps = 0

    def update(self, phase: Phase, global_step: int, seconds: float) -> str:
        """Record the step at `global_step` (not yet counted) that took `seconds`; return the estimate, ``h:mm:ss``."""
        units = step_cost(phase, global_step)
        self.units_left -= units
        self.steps += 1
        if self.steps > 1:
            self.seconds += seconds
            self.units += units
        rate = self.seconds / self.units if self.units else seconds / units
        left = int(round(max(0.0, self.units_left) * rate))
        return f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"


def train_phases(
    accelerator,
    model,
    optimizer,
    ema,
    phases: Sequence[Phase],
    data,
    training_step: Callable,
    *,
    global_step: int,
    seed: int,
    after_step: Callable[[int], None],
    log_keys: Sequence[str] = ("loss",),
    progress=None,
    gradient_accumulation_steps: int = 1,
    max_grad_norm: float | None = None,
    num_workers: int = 0,
    log_step_offset: int = 0,
) -> int:
    """The training loop, phase by phase, from `global_step` to the last phase's end; returns the step reached.

    Each step: the learning rate from `learning_rate_at`, the step's `step_generator`, the phase's mask ratio, then
    `optimizer_step` with the script's ``training_step(batch, generator, mask_ratio)``; then the logs (the
    `log_keys` of its output, the ratio, the learning rate, images per second) and ``after_step(global_step)``
    (checkpoints, validation: `periodic_saves`). Batches of `data` (a `TrainingData`) come from `StepBatchSampler`,
    so the run is a function of (`seed`, step, process).

    Raises:
        FloatingPointError: on every rank, at the first non-finite loss, before anything is saved after it.
    """
    from torch.utils.data import DataLoader

    remaining = RemainingTime(phases, global_step)
    for phase in phases:
        if global_step >= phase.end:
            continue
        sampler = StepBatchSampler(
            len(data.dataset),
            phase.batch_size,
            accelerator.num_processes,
            accelerator.process_index,
            seed=seed + 7919 * list(phases).index(phase),
            start_batch=(global_step - phase.start) * gradient_accumulation_steps,
        )
        loader = DataLoader(data.dataset, batch_sampler=sampler, collate_fn=data.collate_fn, num_workers=num_workers)
        batches = iter(loader)
        model.train()
        while global_step < phase.end:
            tic = time.perf_counter()
            generator = step_generator(seed, global_step, accelerator.process_index, accelerator.device)
            learning_rate = learning_rate_at(phases, global_step)
            set_learning_rate(optimizer, learning_rate)
            mask_ratio = phase.ratio(global_step)
            logs = optimizer_step(
                accelerator,
                model,
                optimizer,
                ema,
                batches,
                training_step,
                generator,
                mask_ratio,
                gradient_accumulation_steps=gradient_accumulation_steps,
                max_grad_norm=phase.max_grad_norm if phase.max_grad_norm is not None else max_grad_norm,
                log_keys=log_keys,
                where=f" at step {global_step} of the {phase.name} phase",
            )
            elapsed = time.perf_counter() - tic
            left = remaining.update(phase, global_step, elapsed)
            global_step += 1
            logs.update(
                mask_ratio=mask_ratio,
                lr=learning_rate,
                images_per_second=phase.batch_size * gradient_accumulation_steps * accelerator.num_processes / elapsed,
            )
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{logs['loss']:.4f}", r=f"{mask_ratio:.2f}", run_left=left)
            accelerator.log(logs, step=log_step_offset + global_step)
            after_step(global_step)
    return global_step
