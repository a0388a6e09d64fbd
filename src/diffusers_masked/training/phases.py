"""Phases of a run and the learning rate: masked training, then a stretch at another mask ratio (MaskDiT's unmasking
tuning, MaskDM's fine-tuning), each with its own batch size, learning rate and mask-ratio schedule.

The learning rate is a function of the step (`learning_rate_at`), set before every step: no scheduler state to
checkpoint, and a run resumed with other phases (say, more steps) follows its own schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..masking import ConstantMaskSchedule, CosinePowerMaskSchedule, StagedMaskSchedule

UNMASK_SCHEDULES = ("zero", "cosine")


@dataclass
class Phase:
    """A stretch of training with its own batch size, learning rate and mask-ratio schedule.

    Args:
        name (`str`): ``"masked"`` or ``"unmask"``; logged, and part of the phase's data-order seed.
        start (`int`): first global step of the phase.
        end (`int`): one past its last global step.
        batch_size (`int`): per-process batch size.
        learning_rate (`float`): peak learning rate.
        mask_schedule (`Callable[[int], float]`): mask ratio by step *within* the phase.
        warmup_steps (`int`, defaults to 0): linear warm-up from the phase's first step.
        max_grad_norm (`float`, *optional*): clip gradients to this norm in this phase (`None`: the run's).
    """

    name: str
    start: int
    end: int
    batch_size: int
    learning_rate: float
    mask_schedule: Callable[[int], float]
    warmup_steps: int = 0
    max_grad_norm: float | None = None

    def ratio(self, global_step: int) -> float:
        return self.mask_schedule(global_step - self.start)

    def learning_rate_at(self, global_step: int) -> float:
        if not self.warmup_steps:
            return self.learning_rate
        return self.learning_rate * min(1.0, (global_step - self.start + 1) / self.warmup_steps)


def build_phases(
    masked_steps: int,
    unmask_steps: int,
    *,
    batch_size: int,
    learning_rate: float,
    mask_schedule: Callable[[int], float],
    warmup_steps: int = 0,
    unmask_batch_size: int | None = None,
    unmask_learning_rate: float | None = None,
    unmask_schedule: str = "zero",
) -> list[Phase]:
    """The masked phase, then the unmasking phase; a phase of 0 steps is left out.

    Args:
        masked_steps (`int`): optimizer steps of masked training.
        unmask_steps (`int`): optimizer steps of the unmasking phase that follows.
        batch_size (`int`): per-process batch size of the masked phase.
        learning_rate (`float`): learning rate of the masked phase.
        mask_schedule (`Callable[[int], float]`): the masked phase's mask ratio by step.
        warmup_steps (`int`, defaults to 0): linear learning-rate warm-up of the masked phase.
        unmask_batch_size (`int`, *optional*): defaults to `batch_size`.
        unmask_learning_rate (`float`, *optional*): defaults to `learning_rate`.
        unmask_schedule (`str`, defaults to ``"zero"``): ``"zero"`` trains at mask ratio 0; ``"cosine"`` decays
            the masked phase's last ratio ``r0`` as ``r0 cos(pi/2 i/n)^4`` (MaskDiT's cosine-ratio schedule).
    """
    if unmask_schedule not in UNMASK_SCHEDULES:
        raise ValueError(f"unmask_schedule must be one of {UNMASK_SCHEDULES}, got {unmask_schedule!r}")
    unmask_batch_size = batch_size if unmask_batch_size is None else unmask_batch_size
    unmask_learning_rate = learning_rate if unmask_learning_rate is None else unmask_learning_rate
    phases = []
    if masked_steps:
        phases.append(Phase("masked", 0, masked_steps, batch_size, learning_rate, mask_schedule, warmup_steps))
    if unmask_steps:
        if unmask_schedule == "zero":
            schedule = ConstantMaskSchedule(0.0)
        else:
            last_ratio = mask_schedule(max(masked_steps - 1, 0))
            schedule = CosinePowerMaskSchedule(num_steps=unmask_steps, initial_ratio=last_ratio, power=4)
        end = masked_steps + unmask_steps
        phases.append(Phase("unmask", masked_steps, end, unmask_batch_size, unmask_learning_rate, schedule))
    return phases


def staged_phases(stages: Sequence[dict], name: str = "masked") -> list[Phase]:
    """Consecutive phases from stage settings, each ``{"steps", "mask_ratio", "batch_size", "learning_rate"}`` with
    optional ``"warmup_steps"`` (restarting at the stage's first step) and ``"max_grad_norm"``: MaskDM's staged
    pre-training, e.g. 90% masks at batch 128 for 200k steps, then 50% at batch 64 with clipping for 500k."""
    phases, start = [], 0
    for i, stage in enumerate(stages):
        end = start + stage["steps"]
        phases.append(
            Phase(
                f"{name}-{i + 1}" if len(stages) > 1 else name,
                start,
                end,
                stage["batch_size"],
                stage["learning_rate"],
                ConstantMaskSchedule(stage["mask_ratio"]),
                stage.get("warmup_steps", 0),
                stage.get("max_grad_norm"),
            )
        )
        start = end
    return phases


def learning_rate_at(phases: Sequence[Phase], step: int) -> float:
    """The learning rate of optimizer step `step` (0-based): its phase's, warmed up; past the end, the last one's.

    A function of the step alone, set before every step: no scheduler state to checkpoint, and a run resumed with
    other phases (say, more steps) follows its own schedule rather than the one the checkpoint's run had.
    """
    for phase in phases:
        if step < phase.end:
            return phase.learning_rate_at(step)
    return phases[-1].learning_rate


def set_learning_rate(optimizer: torch.optim.Optimizer, learning_rate: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = learning_rate


def phases_mask_schedule(phases: Sequence[Phase]):
    """The mask ratio of consecutive constant-ratio phases as one schedule, for the record: the phase's own for one
    phase, a `StagedMaskSchedule` for several (`staged_phases`)."""
    if len(phases) == 1:
        return phases[0].mask_schedule
    return StagedMaskSchedule([(phase.end, phase.ratio(phase.start)) for phase in phases])
