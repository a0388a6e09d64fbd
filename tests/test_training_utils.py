"""diffusers_masked.training_utils: the machinery the training scripts share, tested piece by piece in this process.

The scripts' end-to-end runs (kill -9 and resume, DDP, FSDP2) are in test_train_maskdit.py.
"""

import os

import numpy as np
import pytest
import torch

from diffusers_masked.masking import ConstantMaskSchedule
from diffusers_masked.training_utils import (
    TRAINING_STATE_FILE,
    StepBatchSampler,
    build_phases,
    configure_cpu_threads,
    ema_weights,
    learning_rate_factor,
    list_checkpoints,
)


def test_step_batch_sampler_is_a_function_of_the_batch_index():
    full = StepBatchSampler(100, 8, 1, 0, seed=3)
    stream = iter(full)
    batches = [next(stream) for _ in range(30)]
    resumed = iter(StepBatchSampler(100, 8, 1, 0, seed=3, start_batch=17))
    assert [next(resumed) for _ in range(13)] == batches[17:]
    # an epoch (12 batches of 8 from 100) visits distinct examples
    first_epoch = sum(batches[:12], [])
    assert len(set(first_epoch)) == 96


def test_step_batch_sampler_splits_each_global_batch_between_processes():
    ranks = [iter(StepBatchSampler(64, 4, 2, rank, seed=0)) for rank in range(2)]
    single = iter(StepBatchSampler(64, 8, 1, 0, seed=0))
    for _ in range(10):
        rank0, rank1 = next(ranks[0]), next(ranks[1])
        assert not set(rank0) & set(rank1)
        assert rank0 + rank1 == next(single)


def test_sampler_rejects_a_dataset_smaller_than_a_batch():
    with pytest.raises(ValueError, match="train_batch_size"):
        StepBatchSampler(10, 8, 2, 0, seed=0)


def test_phases_and_cosine_unmasking_schedule():
    masked, unmask = build_phases(
        10, 4, batch_size=8, learning_rate=1e-3, mask_schedule=ConstantMaskSchedule(0.5), unmask_schedule="cosine"
    )
    assert (masked.start, masked.end, unmask.start, unmask.end) == (0, 10, 10, 14)
    assert (unmask.batch_size, unmask.learning_rate) == (8, 1e-3)  # the masked phase's, when not given
    assert masked.ratio(5) == 0.5
    assert unmask.ratio(10) == 0.5 and unmask.ratio(14) == pytest.approx(0.0)
    assert unmask.ratio(12) == pytest.approx(0.5 * np.cos(np.pi / 4) ** 4)


def test_learning_rate_warms_up_linearly_in_the_masked_phase_then_takes_each_phase_rate():
    phases = build_phases(
        6, 3, batch_size=8, learning_rate=1e-3, mask_schedule=ConstantMaskSchedule(0.5), warmup_steps=4,
        unmask_learning_rate=2e-4,
    )  # fmt: skip
    rates = [learning_rate_factor(phases, step, 1e-3) * 1e-3 for step in range(10)]
    expected = [1e-3 * 1 / 4, 1e-3 * 2 / 4, 1e-3 * 3 / 4, 1e-3, 1e-3, 1e-3, 2e-4, 2e-4, 2e-4, 2e-4]
    np.testing.assert_allclose(rates, expected, rtol=1e-12)


def test_cpu_threads_default_to_this_process_share_of_the_cores(monkeypatch):
    # accelerate launch exports OMP_NUM_THREADS=1 for CPU runs; the script must not leave the other cores idle.
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        configure_cpu_threads(None)
        assert torch.get_num_threads() == 4
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
        configure_cpu_threads(None)
        assert torch.get_num_threads() == 1
        configure_cpu_threads(3)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_list_checkpoints_ignores_partial_and_unfinished_folders(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", ".partial-checkpoint-12", "checkpoint-11"):
        (tmp_path / name).mkdir()
    for name in ("checkpoint-2", "checkpoint-10", ".partial-checkpoint-12"):
        (tmp_path / name / TRAINING_STATE_FILE).write_text("{}")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]


def test_ema_weights_swaps_the_average_in_and_restores_the_trained_weights_and_train_mode():
    from diffusers.training_utils import EMAModel

    model = torch.nn.Linear(3, 2)
    ema = EMAModel(model.parameters(), decay=0.5)
    trained = [p.detach().clone() for p in model.parameters()]
    average = [torch.full_like(p, 7.0) for p in model.parameters()]
    ema.shadow_params = [a.clone() for a in average]
    model.train()
    with ema_weights(ema, model) as swapped:
        assert not swapped.training
        for parameter, expected in zip(swapped.parameters(), average):
            assert torch.equal(parameter, expected)
    assert model.training
    for parameter, expected in zip(model.parameters(), trained):
        assert torch.equal(parameter, expected)
