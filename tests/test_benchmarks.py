"""The benchmarks' harness (statistics, process isolation, allocator setting) and what each measurement times
(their timings are measured by running them, never asserted here)."""

import argparse
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"
spec = importlib.util.spec_from_file_location("train_step_benchmark", SCRIPT)
train_step = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_step)  # puts benchmarks/ on sys.path, for the harness

from harness import isolation  # noqa: E402
from harness import statistics as bench_statistics  # noqa: E402
from harness.examples import load_example  # noqa: E402


def test_one_process_interval_is_the_plain_bootstrap_of_the_median():
    rng = random.Random(1)
    values = [1.0 + rng.gauss(0, 0.05) for _ in range(25)]
    low, high = bench_statistics.median_ci([values])
    # An independent plain bootstrap of the median, with many more resamples.
    boot = random.Random(7)
    medians = sorted(statistics.median(boot.choices(values, k=len(values))) for _ in range(20000))
    assert low == pytest.approx(medians[500], abs=0.01) and high == pytest.approx(medians[19500], abs=0.01)
    assert low < statistics.median(values) < high


def test_the_spread_between_processes_widens_the_interval():
    # Four processes whose steps are steady (+-0.2%) but whose levels differ by up to 8%: the steps of all of
    # them pooled as one process would give a narrow interval around the pooled median; resampling the processes
    # must give one that covers the levels' spread.
    rng = random.Random(3)
    levels = [0.98, 1.00, 1.03, 1.06]
    groups = [[level + rng.uniform(-0.002, 0.002) for _ in range(8)] for level in levels]
    pooled = bench_statistics.median_ci([[v for group in groups for v in group]])
    clustered = bench_statistics.median_ci(groups)
    assert clustered[0] <= 0.99 and clustered[1] >= 1.05
    assert clustered[1] - clustered[0] > 1.5 * (pooled[1] - pooled[0])


def test_processes_must_be_positive():
    with pytest.raises(SystemExit):
        train_step.parse_args(["--processes", "0"])


def test_help_renders(capsys):
    # argparse formats every help string with %, so a stray percent sign breaks --help.
    with pytest.raises(SystemExit) as exit_info:
        train_step.parse_args(["--help"])
    assert exit_info.value.code == 0 and "--processes" in capsys.readouterr().out


_TOUCH_REPEATEDLY = """
import sys
import torch
import diffusers_masked.models.masked_dit  # what a worker has imported before its first step
sys.path.insert(0, sys.argv[1])
from harness import isolation as bench
if sys.argv[2] == "keep":
    assert bench.keep_freed_memory()
def touch():
    torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB written, then freed
for _ in range(3):  # as a training run's warm-up steps: the heap grows until a freed block fits the next
    touch()
before = bench.minor_page_faults()
for _ in range(3):
    touch()
print(bench.minor_page_faults() - before)
"""


def _faults_of_three_more_64_mib_blocks(allocator):
    out = subprocess.run(
        [sys.executable, "-c", _TOUCH_REPEATEDLY, str(SCRIPT.parent), allocator],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(isolation.glibc() is None, reason="glibc's mallopt")
def test_keep_freed_memory_stops_freed_blocks_from_faulting_in_anew():
    # glibc's default serves a 64 MiB block (above its largest mmap threshold) by a fresh mmap each time: 16,384
    # pages fault in again per block. Kept, once warm, each block reuses pages an earlier one freed.
    assert _faults_of_three_more_64_mib_blocks("system") > 3 * 15_000
    # Kept: at most one of the three faults in anew (16,384 pages; seen once in CI beside another job's memory
    # churn), against all three under the defaults.
    assert _faults_of_three_more_64_mib_blocks("keep") < 16_384 + 1_000


def test_the_timed_step_is_the_training_scripts_own_step_through_the_librarys_optimizer_step(monkeypatch):
    # The benchmark builds its configuration as examples/train_maskdit.py does and must call that script's
    # training_step (not a copy): a spy put in its place sees every micro-batch of the timed steps.
    script = load_example("train_maskdit")
    calls = []
    real = script.training_step

    def spy(*args, **kwargs):
        calls.append(kwargs["grid_size"])
        return real(*args, **kwargs)

    monkeypatch.setattr(script, "training_step", spy)
    spec = {"kind": "light", "preset": "S/2", "resolution": 8, "official_repo": None, "attention_backend": None}
    spec |= {"compile": "off", "device": "cpu", "dtype": "fp32", "gradient_accumulation_steps": 2, "batch_size": 2}
    step, device, num_parameters = train_step.build_step({**spec, "mask_ratio": 0.5, "seed": 0})
    step()
    assert calls == [(4, 4), (4, 4)]  # two micro-batches of one optimizer step, on the 8x8 / patch-2 grid
    assert device.type == "cpu" and num_parameters > 0


def test_allocator_choice_is_validated():
    assert train_step.parse_args([]).allocator == "keep"
    with pytest.raises(SystemExit):
        train_step.parse_args(["--allocator", "tcmalloc"])


def test_sampling_nfe_runs_every_sampler_and_writes_its_table_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from diffusers_masked import EDMHeunScheduler, MaskDiTPipeline
    from tests.tiny import tiny_transformer

    spec = importlib.util.spec_from_file_location("sampling_nfe", SCRIPT.parent / "sampling_nfe.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    transformer = tiny_transformer(sample_size=16, patch_size=4, in_channels=1, num_layers=1, decoder_num_layers=0)
    MaskDiTPipeline(transformer, EDMHeunScheduler()).save_pretrained(tmp_path / "pipeline")
    argv = ["--pipeline_dir", str(tmp_path / "pipeline"), "--nfes", "3", "5", "--num_samples_per_class", "1"]
    record = bench.main(argv + ["--output", str(tmp_path / "nfe.json"), "--plot", str(tmp_path / "nfe.png")])
    assert [(r["sampler"], r["nfe"], r["num_inference_steps"]) for r in record["results"]] == [
        ("edm_heun", 3, 2), ("edm_heun", 5, 3), ("edm_euler", 3, 3), ("edm_euler", 5, 5),
        ("edm_dpmsolver", 3, 3), ("edm_dpmsolver", 5, 5),
    ]  # fmt: skip
    assert record["target"] is None  # no Heun run at 79 NFE to compare with
    assert json.loads((tmp_path / "nfe.json").read_text())["machine"]["cores"] == os.cpu_count()
    assert (tmp_path / "nfe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| EDM DPM-Solver++ (2M) |" in capsys.readouterr().out


def test_sampling_nfe_maskdm_recipe_runs_ddim_with_each_eta_and_both_dpm_solvers(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from diffusers_masked import MaskDMPipeline
    from tests.tiny import tiny_uvit

    spec = importlib.util.spec_from_file_location("sampling_nfe", SCRIPT.parent / "sampling_nfe.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    transformer = tiny_uvit(sample_size=16, in_channels=1, num_classes=0, seed=0)
    MaskDMPipeline(transformer, MaskDMPipeline.default_scheduler()).save_pretrained(tmp_path / "pipeline")
    argv = ["--recipe", "maskdm", "--pipeline_dir", str(tmp_path / "pipeline"), "--nfes", "1", "2"]
    argv += [
        "--num_samples_per_class",
        "1",
        "--output",
        str(tmp_path / "nfe.json"),
        "--plot",
        str(tmp_path / "nfe.png"),
    ]
    record = bench.main(argv)
    fid = {(r["sampler"], r["nfe"]): r["fid"] for r in record["results"]}
    assert list(fid) == [
        (sampler, nfe) for sampler in ("ddim", "ddim_eta0", "dpmsolver", "dpmsolver_unclipped") for nfe in (1, 2)
    ]
    # One step from t = 999 lands on the model's x0 prediction for deterministic DDIM and for both DPM-Solvers
    # (the images are clipped to [0, 1] at the end, so the bare one's unclipped x0 ends the same): the same samples,
    # the same FID. At two steps DDIM with eta 1 adds noise that eta 0 does not: eta reached the pipeline.
    assert fid["ddim_eta0", 1] == fid["dpmsolver", 1] == fid["dpmsolver_unclipped", 1]
    assert fid["ddim", 2] != fid["ddim_eta0", 2]
    assert record["recipe"] == "maskdm" and record["target"] is None
    assert (tmp_path / "nfe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| DPM-Solver++ (2M), x0 clipped |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--samplers for --recipe maskdm"):
        bench.parse_args(["--recipe", "maskdm", "--samplers", "edm_heun"])


def test_sampling_nfe_refuses_even_nfes():
    spec = importlib.util.spec_from_file_location("sampling_nfe", SCRIPT.parent / "sampling_nfe.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(ValueError, match="--nfes"):
        bench.parse_args(["--nfes", "4"])


def test_gpu_defaults_are_the_issues_batches_and_the_official_repo_must_be_a_checkout(tmp_path):
    args = train_step.parse_args(["--device", "cuda"])
    assert args.batch_sizes == [32, 64, 128] and args.dtype == ["fp32", "bf16"]
    with pytest.raises(SystemExit):
        train_step.parse_args(["--official_repo", str(tmp_path)])


def _time_to_quality():
    spec = importlib.util.spec_from_file_location("time_to_quality", SCRIPT.parent / "time_to_quality.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclass looks its module up there
    spec.loader.exec_module(bench)
    return bench


def test_time_to_quality_interpolates_the_first_crossing_of_the_target_fid():
    bench = _time_to_quality()
    points = [
        {"fid": 40.0, "train_seconds": 10.0},
        {"fid": 30.0, "train_seconds": 20.0},
        {"fid": 10.0, "train_seconds": 30.0},
    ]
    # FID 20 is crossed halfway between the 2nd and 3rd evaluation (linear in time): 20 + 0.5 * 10.
    assert bench.first_time_at(points, 20.0, "train_seconds") == pytest.approx(25.0)
    assert bench.first_time_at(points, 45.0, "train_seconds") == 10.0  # reached at the first evaluation
    assert bench.first_time_at(points, 5.0, "train_seconds") is None
    accuracy = [{"accuracy": 0.2, "step": 10}, {"accuracy": 0.6, "step": 20}, {"accuracy": 1.0, "step": 30}]
    assert bench.first_time_at(accuracy, 0.8, "step", metric="accuracy") == pytest.approx(25.0)  # higher is better
    assert bench.first_time_at(accuracy, 0.1, "step", metric="accuracy") == 10


def test_time_to_quality_explains_a_target_not_reached_by_fid_at_equal_steps_and_time_to_accuracy():
    bench = _time_to_quality()
    point = lambda fid, seconds, step: {"fid": fid, "train_seconds": seconds, "step": step}  # noqa: E731
    base = {"arm": "unmasked", "baseline": None, "seed": 0, "steps": 100, "seconds_per_step": 1.0,
            "points": [point(50.0, 50.0, 50), point(20.0, 100.0, 100)]}  # fmt: skip
    masked = {"arm": "mask_mae", "baseline": "unmasked", "seed": 0, "steps": 200, "seconds_per_step": 0.5,
              "points": [point(60.0, 50.0, 100), point(30.0, 100.0, 200)]}  # fmt: skip
    for run, accuracies in ((base, (0.5, 0.9)), (masked, (0.7, 1.0))):
        for p, a in zip(run["points"], accuracies):
            p["accuracy"] = a
    (row,) = bench.compare([base, masked], argparse.Namespace(budget_seconds=100.0))
    assert row["wall_clock_ratio"] is None and row["steps_to_quality_ratio"] is None  # FID 20 never reached
    assert row["step_time_ratio"] == pytest.approx(0.5)
    assert row["fid_at_baseline_steps"] == 60.0  # its first evaluation was at the baseline's 100 steps
    # The baseline's final accuracy 0.9 is reached at 50 + (0.9 - 0.7) / (1.0 - 0.7) * 50 s of the 100 s budget.
    assert row["target_accuracy"] == 0.9
    assert row["accuracy_wall_clock_ratio"] == pytest.approx((50.0 + 50.0 * 2.0 / 3.0) / 100.0)
    assert bench.fid_at(base["points"], "step", 75) == pytest.approx(35.0)
    assert bench.fid_at(base["points"], "step", 101) is None


def test_time_to_quality_refuses_a_comparison_without_its_baseline():
    with pytest.raises(SystemExit):
        _time_to_quality().parse_args(["--arms", "mask_mae"])


@pytest.mark.slow
def test_time_to_quality_quick_run_writes_runs_comparisons_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    record = _time_to_quality().main(
        ["--quick", "--arms", "unmasked", "mask_mae", "--output", str(tmp_path / "t.json")]
    )
    assert [run["arm"] for run in record["runs"]] == ["unmasked", "mask_mae"]
    assert all(len(run["points"]) == 2 for run in record["runs"])
    assert record["comparisons"][0]["baseline"] == "unmasked"
    assert json.loads((tmp_path / "t.json").read_text())["machine"]["cores"] == os.cpu_count()
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --from_json recomputes the comparisons and the plot of the finished run without training again.
    (tmp_path / "t.png").unlink()
    again = _time_to_quality().main(["--from_json", str(tmp_path / "t.json")])
    assert again["comparisons"] == record["comparisons"] and again["runs"] == record["runs"]
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_unmasked_step_target_is_one_plus_the_light_decoders_flop_share_of_dit():
    # Closed form per token and block: 24 D^2 (qkv, output, 4x MLP; 2 FLOPs per multiply-add) + 4 N D (attention).
    # S/2 at 32x32 latents: N = 256 tokens, DiT 12 blocks of 384, the light decoder 2 blocks of 128.
    per_block = lambda width, tokens: 24 * width**2 + 4 * tokens * width  # noqa: E731
    expected = 1 + 2 * per_block(128, 256) / (12 * per_block(384, 256))
    target = train_step.unmasked_step_target("S/2", 32, 0)
    assert target == pytest.approx(expected, abs=0.005)  # embedders, adaLN and the final layers are the rest
    assert 1.0 < target < 1.05


def test_train_step_builds_the_paper_decoder_and_the_presets_own():
    # The preset's own decoder is what from_preset builds; "paper" is MaskDiT's 8 x 512 at any size.
    paper = train_step.build_model("paper", "S/2", 8)
    preset = train_step.build_model("preset", "S/2", 8)
    assert (paper.config.decoder_num_layers, paper.decoder_dim) == (8, 512)
    assert (preset.config.decoder_num_layers, preset.decoder_dim) == (3, 160)
    assert train_step.decoder_label("paper", "S/2") == "8x512 paper"
    assert train_step.decoder_label("preset", "S/2") == "3x160 preset"
    assert train_step.decoder_label("preset", "XL/2") == "8x512 preset"  # at XL the paper's


def _strategies():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "strategies.py"
    spec = importlib.util.spec_from_file_location("strategies_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_strategies_arms_compare_with_plain_and_route_the_six_block_model():
    strategies = _strategies()
    arms = strategies.arms(strategies.DIGITS_ROUTE)
    assert arms["plain"].baseline is None and not arms["plain"].decoder and arms["plain"].routes is None
    assert all(arm.baseline == "plain" for name, arm in arms.items() if name != "plain")
    assert arms["tread"].routes == arms["maskdit_tread"].routes and arms["maskdit"].routes is None
    from diffusers_masked.routing import Route, resolve_routes

    assert resolve_routes(strategies.DIGITS_ROUTE, 6) == (Route(0.5, 1, 4),)
    assert resolve_routes(strategies.TREAD_ROUTE, 12) == (Route(0.5, 2, 8),)


@pytest.mark.slow
def test_strategies_quick_run_writes_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    record = _strategies().main(["--quick", "--output", str(tmp_path / "s.json")])
    assert [run["arm"] for run in record["digits"]["runs"]] == ["plain", "maskdit", "tread", "maskdit_tread"]
    assert {row["arm"] for row in record["digits"]["comparisons"]} == {"maskdit", "tread", "maskdit_tread"}
    assert [row["size"] for row in record["shapes"]] == ["S/2"] and record["shapes"][0]["flop_ratio"] < 0.8
    assert json.loads((tmp_path / "s.json").read_text())["shapes"][0]["route"] == "ratio 0.5, blocks 2..8"
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "s_digits.json").exists()
