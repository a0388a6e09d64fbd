"""Processes: the run's `Accelerator`, this process's share of the CPU cores, and the checks that keep data-parallel
and FSDP ranks in step (as many processes set up as launched, an error raised on every rank, identical weights).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def setup_accelerator(
    output_dir: str | os.PathLike,
    *,
    gradient_accumulation_steps: int = 1,
    mixed_precision: str | None = None,
    report_to: str = "tensorboard",
    logging_dir: str = "logs",
    use_ema: bool = True,
    cpu_threads: int | None = None,
    seed: int = 0,
    allow_tf32: bool = False,
):
    """The run's `Accelerator` and whether it shards the model (FSDP), after the checks every script needs: as many
    processes set up as launched, EMA only under FSDP version 2, this process's share of the CPU cores, the seed.

    Args:
        output_dir (`str` or `os.PathLike`): the run's folder; TensorBoard logs go to ``output_dir/logging_dir``.
        gradient_accumulation_steps, mixed_precision: passed to `Accelerator`.
        report_to (`str`, defaults to ``"tensorboard"``): a tracker name, or ``"none"``.
        logging_dir (`str`, defaults to ``"logs"``): the trackers' folder inside `output_dir`.
        use_ema (`bool`, defaults to `True`): the run keeps an EMA (refused under FSDP version 1).
        cpu_threads (`int`, *optional*): see `configure_cpu_threads`.
        seed (`int`, defaults to 0): `accelerate.utils.set_seed`.
        allow_tf32 (`bool`, defaults to `False`): TF32 matmuls and convolutions on GPUs that have them.

    DDP runs without `find_unused_parameters`: the models keep every parameter in every training step's graph
    (MaskDiT's mask token too, unmasked), so DDP need not search the graph for unused ones each step.

    Returns:
        `tuple`: ``(accelerator, sharded)``.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration, set_seed

    output_dir = Path(output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=report_to if report_to != "none" else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_distributed_launch(accelerator)
    sharded = accelerator.distributed_type == DistributedType.FSDP
    if sharded and use_ema and not accelerator.is_fsdp2:
        raise ValueError(
            "--use_ema under FSDP needs FSDP version 2 (fsdp_version: 2 in the accelerate config), whose sharded "
            "parameters the EMA follows shard by shard; with FSDP version 1 pass --no-use_ema"
        )
    if accelerator.device.type == "cpu":
        logger.info(f"CPU training: {configure_cpu_threads(cpu_threads)} torch thread(s) per process")
    set_seed(seed)
    if allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator, sharded


def configure_cpu_threads(requested: int | None = None) -> int:
    """Use this process's share of the machine's cores (or `requested`) for torch's intra-op threads.

    `accelerate launch` exports ``OMP_NUM_THREADS=1`` for CPU runs unless it was configured for CPU, which would
    leave all but one core idle. Returns the thread count set.
    """
    if requested is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        requested = max(1, cores // local_processes)
    torch.set_num_threads(requested)
    return requested


def check_distributed_launch(accelerator) -> None:
    """Fail if accelerate set up fewer processes than were launched.

    e.g. an FSDP config on a CPU-only machine: accelerate falls back to no distribution, and every process would
    train alone and overwrite the others' checkpoints.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"{launched} processes were launched but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type.value}); this accelerate config does not distribute on this machine "
            "(FSDP needs a GPU; for CPU data parallelism use ACCELERATE_USE_CPU=true accelerate launch --multi_gpu)"
        )


def raise_on_every_rank(accelerator, message: str | None, error: type[Exception] = ValueError) -> None:
    """Raise `error(message)` on every rank when the main process found `message` (other ranks pass `None`), so no
    rank is left waiting for the others in a collective."""
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([message], from_process=0)[0]
    if message is not None:
        raise error(message)


def check_ranks_agree(accelerator, model) -> None:
    """Data-parallel ranks must end with identical weights; compare a checksum of every parameter."""
    if accelerator.num_processes == 1:
        return
    params = [p.detach().double().flatten() for p in accelerator.unwrap_model(model).parameters()]
    flat = torch.cat(params)
    positions = torch.arange(1, flat.numel() + 1, dtype=flat.dtype, device=flat.device)
    checksum = torch.stack([flat.sum(), (flat * positions).sum()])
    gathered = accelerator.gather(checksum[None])
    if not torch.equal(gathered, gathered[:1].expand_as(gathered)):
        raise RuntimeError(f"data-parallel ranks hold different weights: checksums {gathered.tolist()}")
    logger.info(f"all {accelerator.num_processes} ranks hold identical weights (checksum {checksum.tolist()})")


def end_training(accelerator) -> None:
    """The end of a script's `main`, on every rank: wait until the main process has written the output, then end the
    trackers.

    While a rank waits here without the GIL, gloo's worker threads can free the tensors of earlier collectives; a rank
    that went straight on to exit could deadlock in teardown (torch's ProcessGroupGloo destructor joins those threads
    while holding the GIL)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()


def exit_process() -> None:
    """After `end_training`, leave a distributed run without the interpreter's teardown: there torch's
    ProcessGroupGloo destructor joins gloo's worker threads while holding the GIL, which hung a rank in about 1 of 25
    two-process CPU runs even after the final barrier (pytorch#56297). A single process returns normally."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import sys

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
