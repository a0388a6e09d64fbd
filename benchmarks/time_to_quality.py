#!/usr/bin/env python
"""Time to quality: does masked training reach a given quality sooner than unmasked training on the same clock?

    python benchmarks/time_to_quality.py                      # the three MaskDiT arms, 2 seeds (52 min, 2 cores)
    python benchmarks/time_to_quality.py --arms uvit maskdm   # the MaskDM arm against a U-ViT trained from scratch
    python benchmarks/time_to_quality.py --quick              # a smoke test of the whole path (a minute)

The task has something for masking to save: scikit-learn's digits upsampled to 16x16 with patch 2, 64 tokens per
image (the built-in default recipe's size). `--resolution 32` gives 256 tokens, an ImageNet-256 latent's count at
patch 2, but on 2 CPU cores one step of batch 64 then takes 1.75 s and one evaluation about 4 minutes, so the hour
buys about 275 steps per arm: samples of noise, no quality to reach. Each arm is a small recipe (`ARMS`) trained
for the same
wall-clock budget of *training* seconds; at `--num_evals` evenly spaced points of that clock and at its end the EMA
weights are evaluated with a fixed sampler and fixed seeds (digits-FID against the real training split, the share of
samples classified as their class), and the evaluation's own time is kept off the clock. MaskDiT arms:

    unmasked   mask 0 all along: the DiT-style baseline (the same model, decoder included)
    mask_mae   mask 0.5 + MAE weight 0.1, then unmasking tuning for the last `unmask_fraction` of the budget
    mask       mask 0.5 without the MAE term, the same unmasking tail (isolates what the MAE term adds)

MaskDM arms (pixel-space U-ViT, DDPM, unconditional; FID only): `maskdm` (masked pre-training at 0.5, then
fine-tuning for the last `unmask_fraction`), `uvit` (the same model trained unmasked from scratch).

Reported: for each masked arm and seed, the wall-clock at which its FID first reaches the baseline's final FID (FID
interpolated linearly between evaluation points), as a ratio of the budget, and its two factors: the step-time ratio
(seconds per step, masked over baseline) and the steps-to-quality ratio; for an arm that does not reach it within
the budget, its FID after the baseline's number of steps, and (class-conditional arms) the wall-clock ratio at which
it reaches the baseline's final class accuracy. Target (MaskDiT): <= 0.5 (the paper: 0.31 on ImageNet-256). Prints
a table, writes JSON and a PNG plot (FID and accuracy against wall-clock and against steps); `--from_json` redoes
the table, comparisons and plot of a finished run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from diffusers.training_utils import EMAModel

from diffusers_masked import (
    EDMHeunScheduler,
    MaskDiTPipeline,
    MaskDMPipeline,
    MaskedDDPMScheduler,
    MaskedDiTTransformer2DModel,
    MaskedUViTTransformer2DModel,
    drop_class_labels,
)
from diffusers_masked.data import load_digits_arrays
from diffusers_masked.evaluation import evaluate_pipeline_on_digits

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this script, also when loaded by path
from harness.report import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
# The built-in default's MaskDiT (6 x 128 encoder, 2 x 64 decoder) and a U-ViT of the same width, at patch 2 (the
# sample size is --resolution's).
MASKDIT_CONFIG = dict(
    patch_size=2, in_channels=1, num_layers=6, num_attention_heads=4, attention_head_dim=32,
    decoder_num_layers=2, decoder_num_attention_heads=2, decoder_attention_head_dim=32, num_classes=NUM_CLASSES,
)  # fmt: skip
UVIT_CONFIG = dict(patch_size=2, in_channels=1, num_layers=7, num_attention_heads=4, attention_head_dim=32)
QUICK_OVERRIDES = dict(num_layers=1, decoder_num_layers=1)


@dataclass(frozen=True)
class Arm:
    """One way to spend the budget: `method` picks the model and objective, the rest the masking recipe."""

    method: str  # "maskdit" (EDM + MAE, class-conditional) or "maskdm" (DDPM, unconditional)
    mask_ratio: float
    mae_loss_weight: float = 0.0
    unmask_fraction: float = 0.0  # the last fraction of the budget trained at mask ratio 0
    baseline: str | None = None  # the unmasked arm this one is compared with; None for a baseline
    routes: str | None = None  # token routing (TREAD) at every step, as --tread_routes takes it
    decoder: bool = True  # MaskDiT arms: keep the model's decoder (False: a plain DiT, decoder_num_layers=0)


ARMS = {
    "unmasked": Arm("maskdit", 0.0),
    "mask_mae": Arm("maskdit", 0.5, mae_loss_weight=0.1, unmask_fraction=0.1, baseline="unmasked"),
    "mask": Arm("maskdit", 0.5, unmask_fraction=0.1, baseline="unmasked"),
    "uvit": Arm("maskdm", 0.0),
    "maskdm": Arm("maskdm", 0.5, unmask_fraction=0.2, baseline="uvit"),
}


def tokens(args) -> int:
    return (args.resolution // 2) ** 2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", default=["unmasked", "mask_mae", "mask"], choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument(
        "--resolution", type=int, default=16, choices=(16, 32), help="Digits side: 64 or 256 tokens at patch 2."
    )
    parser.add_argument("--budget_seconds", type=float, default=360.0, help="Training seconds per arm and seed.")
    parser.add_argument("--num_evals", type=int, default=8, help="Evaluation points along the clock (>= 1).")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--warmup_steps", type=int, default=100)
    parser.add_argument("--ema_decay", type=float, default=0.999)
    parser.add_argument("--eval_samples_per_class", type=int, default=20)
    parser.add_argument("--eval_steps", type=int, default=12, help="EDM Heun steps (MaskDiT), DDIM steps (MaskDM).")
    parser.add_argument("--guidance_scale", type=float, default=1.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="A tiny smoke test of the whole path.")
    parser.add_argument(
        "--from_json", default=None, help="A finished run's JSON: recompute its comparisons, table and plot only."
    )
    parser.add_argument(
        "--output", default=None, help="JSON path; default benchmarks/results/time_to_quality.json, or --from_json's."
    )
    parser.add_argument("--plot", default=None, help="PNG path; default: --output with .png.")
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = args.from_json or str(REPO / "benchmarks" / "results" / "time_to_quality.json")
    if args.quick:
        args.seeds, args.budget_seconds, args.num_evals = args.seeds[:1], 3.0, 2
        args.batch_size, args.eval_samples_per_class, args.eval_steps, args.warmup_steps = 8, 2, 2, 2
    for name in ("num_evals", "batch_size", "eval_samples_per_class", "eval_steps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("budget_seconds", "learning_rate"):
        if not math.isfinite(getattr(args, name)) or getattr(args, name) <= 0:
            parser.error(f"--{name} must be a finite number > 0, got {getattr(args, name)}")
    if args.warmup_steps < 0 or not 0 <= args.ema_decay <= 1:
        parser.error("--warmup_steps must be >= 0 and --ema_decay in [0, 1]")
    missing = sorted({ARMS[a].baseline for a in args.arms} - set(args.arms) - {None})
    if missing:
        parser.error(f"--arms {args.arms} compares with {missing}: add them")
    return args


def build(arm: Arm, quick: bool, resolution: int):
    """The model, its training scheduler, and how to make a sampling pipeline of it."""
    if arm.method == "maskdit":
        config = {**MASKDIT_CONFIG, "sample_size": resolution, **(QUICK_OVERRIDES if quick else {})}
        if not arm.decoder:
            config["decoder_num_layers"] = 0
        model = MaskedDiTTransformer2DModel(**config)
        return model, EDMHeunScheduler(), lambda m: MaskDiTPipeline(m, EDMHeunScheduler())
    config = {**UVIT_CONFIG, "sample_size": resolution, **({"num_layers": 1} if quick else {})}
    scheduler = MaskedDDPMScheduler(beta_schedule="squaredcos_cap_v2")
    return (
        MaskedUViTTransformer2DModel(**config),
        scheduler,
        lambda m: MaskDMPipeline(m, MaskDMPipeline.default_scheduler(scheduler.config)),
    )


def evaluate(make_pipeline, model, ema, args) -> dict:
    ema_model = copy.deepcopy(model).eval()
    ema.copy_to(ema_model.parameters())
    pipeline = make_pipeline(ema_model)
    pipeline.set_progress_bar_config(disable=True)
    results = evaluate_pipeline_on_digits(
        pipeline,
        num_samples_per_class=args.eval_samples_per_class,
        generator=torch.Generator().manual_seed(1234),
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.eval_steps,
        seed=0,
    )
    return {
        "fid": float(results["fid"]),
        "accuracy": results.get("accuracy"),
        "fid_floor": float(results["fid_floor"]),
    }


def train_arm(name: str, seed: int, images: torch.Tensor, labels: torch.Tensor, args) -> dict:
    """Train `name` for the budget; the clock counts training steps only (evaluations stop it)."""
    arm = ARMS[name]
    torch.manual_seed(seed)
    model, scheduler, make_pipeline = build(arm, args.quick, args.resolution)
    model.train()
    ema = EMAModel(model.parameters(), decay=args.ema_decay, use_ema_warmup=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    eval_at = [args.budget_seconds * (i + 1) / args.num_evals for i in range(args.num_evals)]
    tuning_from = args.budget_seconds * (1 - arm.unmask_fraction)
    clock, step, points = 0.0, 0, []
    while clock < args.budget_seconds:
        ratio = arm.mask_ratio if clock < tuning_from else 0.0
        start = time.perf_counter()
        index = torch.randint(len(images), (args.batch_size,), generator=generator)
        class_labels = None
        if arm.method == "maskdit":
            class_labels = drop_class_labels(labels[index], NUM_CLASSES, dropout_prob=0.1, generator=generator)
        out = scheduler.masked_training_loss(
            model, images[index], class_labels, mask_ratio=ratio,
            mae_loss_weight=arm.mae_loss_weight if ratio else 0.0, generator=generator, routes=arm.routes,
        )  # fmt: skip
        for group in optimizer.param_groups:
            group["lr"] = args.learning_rate * min(1.0, (step + 1) / max(1, args.warmup_steps))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.step(model.parameters())
        clock += time.perf_counter() - start
        step += 1
        if clock >= eval_at[len(points)] or clock >= args.budget_seconds:
            points.append(
                {
                    "train_seconds": clock,
                    "step": step,
                    "mask_ratio": ratio,
                    **evaluate(make_pipeline, model, ema, args),
                }
            )
            print(f"  {name} seed {seed}: {clock:7.1f} s, step {step:5d}, FID {points[-1]['fid']:.2f}", flush=True)
    while len(points) < args.num_evals:  # a step that overran several points: they share its evaluation
        points.append(dict(points[-1]))
    return {
        "arm": name,
        "seed": seed,
        **asdict(arm),
        "steps": step,
        "seconds_per_step": clock / step,
        "points": points,
    }


def first_time_at(points: list[dict], target: float, key: str, metric: str = "fid") -> float | None:
    """The first `key` (seconds or steps) at which `metric` reaches `target` (FID: at or below it; accuracy: at or
    above it), interpolated linearly between evaluations."""
    sign = 1.0 if metric == "fid" else -1.0  # make both "lower is better"
    previous = None
    for point in points:
        if sign * point[metric] <= sign * target:
            if previous is None:
                return point[key]
            fraction = (previous[metric] - target) / (previous[metric] - point[metric])
            return previous[key] + fraction * (point[key] - previous[key])
        previous = point
    return None


def fid_at(points: list[dict], key: str, value: float) -> float | None:
    """FID at `value` of `key` (seconds or steps), interpolated linearly between evaluations; None past the last."""
    previous = None
    for point in points:
        if point[key] >= value:
            if previous is None or point[key] == previous[key]:
                return point["fid"]
            fraction = (value - previous[key]) / (point[key] - previous[key])
            return previous["fid"] + fraction * (point["fid"] - previous["fid"])
        previous = point
    return None


def compare(runs: list[dict], args) -> list[dict]:
    """For each masked arm and seed: when it reaches the same seed's baseline final FID, and why; also, for an arm that
    does not reach it, the masked arm's FID after the baseline's number of steps (what a step teaches), and when it
    reaches the baseline's final class accuracy."""
    rows = []
    for run in runs:
        if run["baseline"] is None:
            continue
        base = next(r for r in runs if r["arm"] == run["baseline"] and r["seed"] == run["seed"])
        target = base["points"][-1]["fid"]
        seconds = first_time_at(run["points"], target, "train_seconds")
        steps = first_time_at(run["points"], target, "step")
        rows.append({
            "arm": run["arm"], "baseline": base["arm"], "seed": run["seed"], "target_fid": target,
            "final_fid": run["points"][-1]["fid"],
            "wall_clock_ratio": None if seconds is None else seconds / args.budget_seconds,
            "step_time_ratio": run["seconds_per_step"] / base["seconds_per_step"],
            "steps_to_quality_ratio": None if steps is None else steps / base["steps"],
        })  # fmt: skip
        rows[-1]["fid_at_baseline_steps"] = fid_at(run["points"], "step", base["steps"])
        accuracy = base["points"][-1]["accuracy"]
        if accuracy is not None:  # class-conditional arms: when the baseline's final sample accuracy is reached
            seconds = first_time_at(run["points"], accuracy, "train_seconds", metric="accuracy")
            rows[-1]["target_accuracy"] = accuracy
            rows[-1]["accuracy_wall_clock_ratio"] = None if seconds is None else seconds / args.budget_seconds
    return rows


def summarise(rows: list[dict]) -> dict:
    summary = {}
    for arm in sorted({r["arm"] for r in rows}):
        ratios = [r["wall_clock_ratio"] for r in rows if r["arm"] == arm]
        reached = [x for x in ratios if x is not None]
        summary[arm] = {
            "reached": f"{len(reached)}/{len(ratios)}",
            "wall_clock_ratio_mean": float(np.mean(reached)) if reached else None,
            "wall_clock_ratio_range": [min(reached), max(reached)] if reached else None,
            "target_met": bool(reached) and len(reached) == len(ratios) and max(reached) <= 0.5,
        }
        accuracy = [r.get("accuracy_wall_clock_ratio") for r in rows if r["arm"] == arm]
        if all(x is not None for x in accuracy):
            summary[arm]["accuracy_wall_clock_ratio_range"] = [min(accuracy), max(accuracy)]
    return summary


def table(runs: list[dict], rows: list[dict]) -> str:
    lines = ["| arm | seed | steps | s/step | final FID | final accuracy |", "|---|---|---|---|---|---|"]
    for run in runs:
        final = run["points"][-1]
        accuracy = "-" if final["accuracy"] is None else f"{final['accuracy']:.1%}"
        lines.append(
            f"| {run['arm']} | {run['seed']} | {run['steps']} | {run['seconds_per_step']:.3f} | {final['fid']:.2f} "
            f"| {accuracy} |"
        )
    lines += [
        "",
        "| arm vs baseline | seed | target FID | wall-clock ratio | step-time ratio | steps ratio "
        "| FID after baseline's steps | wall-clock ratio to baseline's final accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        fmt = lambda x: "not reached" if x is None else f"{x:.3f}"  # noqa: E731
        at_steps = "-" if row["fid_at_baseline_steps"] is None else f"{row['fid_at_baseline_steps']:.2f}"
        accuracy = "-" if "target_accuracy" not in row else fmt(row["accuracy_wall_clock_ratio"])
        lines.append(
            f"| {row['arm']} vs {row['baseline']} | {row['seed']} | {row['target_fid']:.2f} | "
            f"{fmt(row['wall_clock_ratio'])} | {row['step_time_ratio']:.3f} | {fmt(row['steps_to_quality_ratio'])} "
            f"| {at_steps} | {accuracy} |"
        )
    return "\n".join(lines)


def plot(runs: list[dict], path: str, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 2 if any(run["points"][0]["accuracy"] is not None for run in runs) else 1  # unconditional: FID only
    figure, axes = plt.subplots(rows, 2, figsize=(11, 4 * rows), squeeze=False)
    colours = dict(zip(ARMS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for run in runs:
        style = dict(color=colours[run["arm"]], marker="o", linestyle="-" if run["seed"] == runs[0]["seed"] else "--")
        label = f"{run['arm']} (seed {run['seed']})"
        for column, key in enumerate(("train_seconds", "step")):
            x = [p[key] for p in run["points"]]
            axes[0, column].plot(x, [p["fid"] for p in run["points"]], label=label, **style)
            if run["points"][0]["accuracy"] is not None:
                axes[1, column].plot(x, [p["accuracy"] for p in run["points"]], label=label, **style)
    for column, xlabel in enumerate(("training wall-clock (s)", "training steps")):
        axes[0, column].set(xlabel=xlabel, ylabel="digits-FID", yscale="log")
        if rows == 2:
            axes[1, column].set(xlabel=xlabel, ylabel="class accuracy of samples")
    axes[0, 0].legend(fontsize=8)
    figure.suptitle(f"Time to quality: digits {args.resolution}x{args.resolution}, patch 2 ({tokens(args)} tokens)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.from_json:  # recompute the comparisons, table and plot of a finished run; no training
        record = json.loads(Path(args.from_json).read_text())
        args = argparse.Namespace(**{**vars(args), **record["settings"], "from_json": args.from_json})
        record["comparisons"] = rows = compare(record["runs"], args)
        record["summary"] = summarise(rows)
        runs = record["runs"]
    else:
        torch.set_num_threads(args.threads)
        digits = load_digits_arrays(resolution=args.resolution, seed=0, holdout_fraction=0.2)["train"]
        images = torch.from_numpy(digits[0]).float().div(127.5).sub(1.0)[:, None]  # [N, 1, H, W] in [-1, 1]
        labels = torch.from_numpy(digits[1])
        runs = [train_arm(arm, seed, images, labels, args) for seed in args.seeds for arm in args.arms]
        rows = compare(runs, args)
        record = {
            "command": "python benchmarks/time_to_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "settings": {k: v for k, v in vars(args).items() if k not in ("output", "plot", "from_json")},
            "runs": runs,
            "comparisons": rows,
            "summary": summarise(rows),
            "machine": machine(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    print(table(runs, rows))
    print(json.dumps(record["summary"], indent=2))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    plot(runs, args.plot or str(Path(args.output).with_suffix(".png")), args)
    return record


if __name__ == "__main__":
    main()
