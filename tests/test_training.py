"""diffusers_masked.training: the machinery the training scripts share, tested piece by piece in this process.

The scripts' end-to-end runs (kill -9 and resume, DDP, FSDP2) are in test_train_maskdit.py.
"""

import argparse
import os
import pickle
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffusers_masked.masking import ConstantMaskSchedule
from diffusers_masked.training.arguments import finite_float, int_at_least, resolve_model_config
from diffusers_masked.training.batches import StepBatchSampler
from diffusers_masked.training.checkpoints import (
    TRAINING_STATE_FILE,
    check_model_config,
    list_checkpoints,
    restore_checkpoint,
    save_checkpoint,
)
from diffusers_masked.training.data import check_labels
from diffusers_masked.training.distributed import configure_cpu_threads
from diffusers_masked.training.ema import ema_weights
from diffusers_masked.training.phases import build_phases, learning_rate_at
from diffusers_masked.training.run import LOCK_FILE, check_lineage, lock_output_dir, publish_pipeline
from diffusers_masked.utils.safe_loading import check_dcp_metadata


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
    with pytest.raises(ValueError, match="fewer than one global batch"):
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
    rates = [learning_rate_at(phases, step) for step in range(10)]
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


# ------------------------------------------------------------------------------------------------ checkpoints


class _RunsCode:
    """Unpickling this writes a marker file: what a malicious checkpoint file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _plant(path, marker, as_torch_archive):
    path.unlink()
    if as_torch_archive:
        torch.save({"state": _RunsCode(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_RunsCode(marker)))


@pytest.fixture
def trained(tmp_path):
    """A prepared tiny model, optimizer and EMA after one step, and its checkpoint-1."""
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMAModel(model.parameters(), decay=0.9)
    model(torch.randn(2, 4)).square().mean().backward()
    optimizer.step()
    ema.step(model.parameters())
    state = {"run_id": "run-a", "model_config": {"width": 4}, "run": {}}
    checkpoint = save_checkpoint(accelerator, tmp_path / "out", 1, None, state, ema)
    return accelerator, model, optimizer, ema, checkpoint


def test_a_checkpoint_holds_no_file_that_needs_unpickling_code(trained):
    *_, checkpoint = trained
    names = {p.name for p in checkpoint.iterdir()}
    assert names == {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "ema.safetensors", "ema_state.json",
                     TRAINING_STATE_FILE}  # fmt: skip


def test_resume_restores_model_optimizer_and_ema(trained):
    accelerator, model, optimizer, ema, checkpoint = trained
    saved_weights = [p.detach().clone() for p in model.parameters()]
    saved_shadow = [s.clone() for s in ema.shadow_params]
    saved_moments = [optimizer.state[p]["exp_avg"].clone() for p in model.parameters()]
    with torch.no_grad():
        for tensor in [
            *model.parameters(),
            *ema.shadow_params,
            *(optimizer.state[p]["exp_avg"] for p in model.parameters()),
        ]:
            tensor.add_(1.0)
    ema.optimization_step = 99
    state = restore_checkpoint(accelerator, checkpoint, ema)
    assert state["global_step"] == 1 and state["run_id"] == "run-a"
    moments = (optimizer.state[p]["exp_avg"] for p in model.parameters())
    for tensors, expected in ((model.parameters(), saved_weights), (ema.shadow_params, saved_shadow),
                              (moments, saved_moments)):  # fmt: skip
        for tensor, value in zip(tensors, expected):
            assert torch.equal(tensor, value)
    assert ema.optimization_step == 1


@pytest.mark.parametrize("as_torch_archive", [True, False], ids=["torch-archive", "raw-pickle"])
@pytest.mark.parametrize(
    "name", ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "ema.safetensors", "ema_state.json",
             TRAINING_STATE_FILE, "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"],
)  # fmt: skip
def test_a_code_running_pickle_in_place_of_any_checkpoint_file_is_refused_without_running(
    trained, tmp_path, name, as_torch_archive
):
    accelerator, model, optimizer, ema, checkpoint = trained
    marker = tmp_path / "marker"
    target = checkpoint / name
    target.touch()  # the custom_checkpoint files are planted beside the real ones
    _plant(target, marker, as_torch_archive)
    with pytest.raises(ValueError, match=name):
        restore_checkpoint(accelerator, checkpoint, ema)
    assert not marker.exists()


def test_a_code_running_sharded_checkpoint_index_is_refused_and_a_real_one_passes(tmp_path):
    import torch.distributed.checkpoint as dcp

    dcp.save(
        {"w": torch.zeros(3, dtype=torch.bfloat16), "step": 3, "groups": [{"lr": 1e-3}]},
        checkpoint_id=str(tmp_path / "real"),
    )
    check_dcp_metadata(tmp_path / "real" / ".metadata")
    marker = tmp_path / "marker"
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(ValueError, match="builtins.exec"):
        check_dcp_metadata(tmp_path / "evil" / ".metadata")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin", "ema.safetensors", TRAINING_STATE_FILE])
@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_damaged_checkpoint_file_is_reported_with_its_path(trained, name, damage):
    accelerator, model, optimizer, ema, checkpoint = trained
    path = checkpoint / name
    if damage == "deleted":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=str(path)):
        restore_checkpoint(accelerator, checkpoint, ema)


def test_pruning_keeps_the_checkpoints_of_another_run(trained):
    accelerator, model, optimizer, ema, checkpoint = trained
    out = checkpoint.parent
    other = {"run_id": "run-b", "model_config": {"width": 4}, "run": {}}
    for step in (2, 3):
        save_checkpoint(accelerator, out, step, 1, other, ema)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-3"]
    assert [p.name for p in list_checkpoints(out, run_id="run-b")] == ["checkpoint-3"]


def test_a_new_run_is_refused_a_folder_holding_another_runs_checkpoints(trained):
    *_, checkpoint = trained
    assert "checkpoint-1" in check_lineage(checkpoint.parent, "run-new", resuming=False)
    assert check_lineage(checkpoint.parent, "run-a", resuming=True) is None


def test_resuming_into_another_model_config_is_refused_naming_the_keys():
    recorded = {"num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2}
    with pytest.raises(ValueError, match="attention_head_dim: 16 in the checkpoint, 8 now") as info:
        check_model_config(recorded, {"num_attention_heads": 4, "attention_head_dim": 8, "num_layers": 2})
    assert "num_attention_heads" in str(info.value) and "num_layers" not in str(info.value)
    check_model_config(recorded, dict(recorded, _diffusers_version="0.42"))


# ------------------------------------------------------------------------------------------------ one run per folder


def test_an_output_dir_held_by_a_live_run_is_refused(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    held = lock_output_dir(accelerator, tmp_path)
    try:
        with pytest.raises(RuntimeError, match=f"pid {os.getpid()}"):
            lock_output_dir(accelerator, tmp_path)
    finally:
        held.close()


def test_the_lock_of_a_killed_run_does_not_block_its_resume(tmp_path):
    from accelerate import Accelerator

    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); time.sleep(60)", str(tmp_path / LOCK_FILE)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RuntimeError, match="in use"):
        lock_output_dir(Accelerator(cpu=True), tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock_output_dir(Accelerator(cpu=True), tmp_path).close()


def test_publishing_a_pipeline_leaves_no_pipeline_or_the_complete_new_one_wherever_it_stops(tmp_path, monkeypatch):
    from diffusers_masked import EDMHeunScheduler, MaskDiTPipeline
    from tests.tiny import tiny_transformer

    old = MaskDiTPipeline(transformer=tiny_transformer(seed=1), scheduler=EDMHeunScheduler())
    new = MaskDiTPipeline(transformer=tiny_transformer(seed=2), scheduler=EDMHeunScheduler())
    expected = new.transformer.state_dict()
    real_replace, stops = os.replace, 0
    while True:
        out = tmp_path / f"stop-{stops}"
        publish_pipeline(old, out)
        calls = []

        def replace(src, dst, calls=calls, stops=stops):
            if len(calls) == stops:
                raise KeyboardInterrupt("killed")
            calls.append(dst)
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        try:
            publish_pipeline(new, out)
            finished = True
        except KeyboardInterrupt:
            finished = False
        monkeypatch.setattr(os, "replace", real_replace)
        if (out / "model_index.json").exists():
            loaded = MaskDiTPipeline.from_pretrained(out).transformer.state_dict()
            assert all(torch.equal(loaded[k], expected[k]) for k in expected), f"stopped after {stops} renames"
        if finished:
            break
        stops += 1
    assert stops >= 3


# ------------------------------------------------------------------------------------------------ flags and data


def test_model_config_errors_say_what_the_spec_was_taken_for(tmp_path):
    from diffusers_masked import MaskedDiTTransformer2DModel as Model

    with pytest.raises(ValueError, match="no such config file"):
        resolve_model_config(str(tmp_path / "missing.json"), Model)
    with pytest.raises(ValueError, match="not valid JSON.*char"):
        resolve_model_config('{"num_layers": 2,}', Model)
    with pytest.raises(ValueError, match="does not take: \\['num_layer'\\]"):
        resolve_model_config('{"num_layer": 2}', Model)
    assert resolve_model_config("S/2", Model) == Model.preset_config("S/2")


@pytest.mark.parametrize(
    "spec",
    [
        '{"num_attention_heads": 2, "attention_head_dim": 0}',
        '{"decoder_num_layers": -1}',
        '{"patch_size": 4, "sample_size": 10}',
    ],
)
def test_a_model_config_the_model_refuses_fails_when_resolved_before_any_data(spec):
    from diffusers_masked import MaskedDiTTransformer2DModel

    with pytest.raises(ValueError, match="does not make a MaskedDiTTransformer2DModel"):
        resolve_model_config(spec, MaskedDiTTransformer2DModel)
    # A config without sample_size is completed from the data later; the probe must not refuse it.
    assert resolve_model_config('{"patch_size": 4}', MaskedDiTTransformer2DModel) == {"patch_size": 4}


def test_labels_at_or_above_num_classes_are_refused_before_training():
    import datasets

    data = datasets.Dataset.from_dict({"label": list(range(10))})
    assert check_labels(data, None, None) == 10
    assert check_labels(data, None, 12) == 12
    with pytest.raises(ValueError, match="num_classes is 9 but the data has labels up to 9"):
        check_labels(data, None, 9)
    with pytest.raises(ValueError, match="no labels"):
        check_labels(data.rename_column("label", "x"), None, None)


@pytest.mark.parametrize("text", ["0", "-1", "1.5", "x"])
def test_counts_must_be_integers_of_at_least_one(text):
    with pytest.raises(argparse.ArgumentTypeError, match=">= 1"):
        int_at_least(1)(text)


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "0", "-0.001"])
def test_positive_floats_must_be_finite_and_positive(text):
    with pytest.raises(argparse.ArgumentTypeError):
        finite_float(0, low_open=True)(text)
    assert finite_float(0, low_open=True)("1e-4") == 1e-4


def test_the_progress_bars_remaining_time_weighs_unmasked_steps_by_their_cost():
    # 10 masked steps at ratio 0.5, then 5 unmasked ones, batch 4: a masked step is 4 * 0.5 = 2 units, an unmasked
    # one 4. The first step's time (one-off costs) is left out of the rate; then 1 s per masked step = 0.5 s/unit.
    from diffusers_masked.training.loop import RemainingTime
    from diffusers_masked.training.phases import Phase

    masked = Phase("masked", 0, 10, 4, 1e-3, ConstantMaskSchedule(0.5))
    unmask = Phase("unmask", 10, 15, 4, 1e-3, ConstantMaskSchedule(0.0))
    remaining = RemainingTime([masked, unmask], global_step=0)
    assert remaining.units_left == 10 * 2 + 5 * 4
    remaining.update(masked, 0, 30.0)
    # Step 1 at 1 s: 8 masked steps (16 units) + 5 unmasked (20 units) left at 0.5 s/unit = 18 s; tqdm's
    # steps-times-rate would say 13 s.
    assert remaining.update(masked, 1, 1.0) == "0:00:18"
    # A resumed run counts only the steps from where it starts.
    assert RemainingTime([masked, unmask], global_step=12).units_left == 3 * 4
    # Past an hour the hours show.
    long = RemainingTime([Phase("unmask", 0, 4001, 1, 1e-3, ConstantMaskSchedule(0.0))], global_step=0)
    long.update(long.phases[0], 0, 5.0)
    assert long.update(long.phases[0], 1, 1.0) == "1:06:39"  # 3999 steps left at 1 s
