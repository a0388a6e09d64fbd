#!/usr/bin/env python
"""Digits-FID against the number of model evaluations (NFE): EDM Heun, EDM Euler and EDM DPM-Solver++ (2M) on a
MaskDiT trained with the built-in default recipe, or (`--recipe maskdm`) DDIM and DPM-Solver++ on a MaskDM U-ViT
trained with its default (or a given pipeline folder of either).

    python benchmarks/sampling_nfe.py                                  # trains the default recipe first
    python benchmarks/sampling_nfe.py --pipeline_dir maskdit-digits    # an existing digits pipeline
    python benchmarks/sampling_nfe.py -- --max_train_steps 500         # after --: passed to the training script
    python benchmarks/sampling_nfe.py --recipe maskdm --pipeline_dir maskdm-digits

Heun's N steps cost 2N - 1 evaluations, the other samplers' N. Every sampler and NFE draws the same samples' worth
of starting noise (the same seed) and is scored by `evaluate_pipeline_on_digits` (36 samples per class, the
real-vs-real floor at that size alongside). Target (MaskDiT): DPM-Solver++ at 20 NFE or fewer within 5% of Heun's
FID at 79. The MaskDM samplers are DDIM with eta 1 (the official evaluation) and 0, DPM-Solver++ with x0 clipped
(`MaskDMPipeline.dpm_solver_scheduler`) and, to show why the clipping is there, a bare
`DPMSolverMultistepScheduler.from_config`. Prints a table, writes JSON and a PNG plot into benchmarks/results/.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from diffusers_masked.evaluation import evaluate_pipeline_on_digits, sampling

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this script, also when loaded by path
from harness.report import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLERS = {"edm_heun": "EDM Heun", "edm_euler": "EDM Euler", "edm_dpmsolver": "EDM DPM-Solver++ (2M)"}
MASKDM_SAMPLERS = {
    "ddim": "DDIM, eta 1",
    "ddim_eta0": "DDIM, eta 0",
    "dpmsolver": "DPM-Solver++ (2M), x0 clipped",
    "dpmsolver_unclipped": "DPM-Solver++ (2M), bare",
}
# Odd, so that Heun (2N - 1 evaluations) reaches each one exactly.
DEFAULT_NFES = [5, 7, 9, 11, 15, 19, 25, 35, 49, 79]
MASKDM_NFES = [10, 25, 50, 100, 250]
TARGET_NFE, TARGET_TOLERANCE = 20, 0.05
RECIPES = {
    # samplers, NFEs, training script, folder of a run trained here, JSON and plot names
    "maskdit": (SAMPLERS, DEFAULT_NFES, "train_maskdit.py", "maskdit-digits-nfe", "sampling_nfe"),
    "maskdm": (MASKDM_SAMPLERS, MASKDM_NFES, "train_maskdm.py", "maskdm-digits-nfe", "sampling_nfe_maskdm"),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=tuple(RECIPES), default="maskdit", help="MaskDiT (EDM) or MaskDM (DDPM).")
    parser.add_argument(
        "--pipeline_dir", default=None, help="A saved digits pipeline of the recipe; default: train one."
    )
    parser.add_argument("--output_dir", default=None, help="Where a run trained here goes.")
    parser.add_argument("--output", default=None, help="Default: benchmarks/results/sampling_nfe[_maskdm].json.")
    parser.add_argument("--plot", default=None, help="Default: benchmarks/results/sampling_nfe[_maskdm].png.")
    parser.add_argument("--nfes", type=int, nargs="+", default=None, help="Odd numbers from 3 with Heun.")
    parser.add_argument("--samplers", nargs="+", choices=sorted({**SAMPLERS, **MASKDM_SAMPLERS}), default=None)
    parser.add_argument("--num_samples_per_class", type=int, default=36)
    parser.add_argument("--guidance_scale", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=120)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: passed to the training script")
    args = parser.parse_args(argv)
    samplers, nfes, _, folder, name = RECIPES[args.recipe]
    results_dir = REPO / "benchmarks" / "results"
    args.output_dir = args.output_dir or str(results_dir / folder)
    args.output = args.output or str(results_dir / f"{name}.json")
    args.plot = args.plot or str(results_dir / f"{name}.png")
    args.nfes = args.nfes or list(nfes)
    args.samplers = args.samplers or list(samplers)
    wrong = [s for s in args.samplers if s not in samplers]
    if wrong:
        raise ValueError(f"--samplers for --recipe {args.recipe} must be among {list(samplers)}, got {wrong}")
    low = 3 if "edm_heun" in args.samplers else 1
    bad = [n for n in args.nfes if n < low or (low == 3 and n % 2 == 0)]
    if bad:
        rule = "odd numbers >= 3 (Heun's N steps make 2N - 1 evaluations)" if low == 3 else "integers >= 1"
        raise ValueError(f"--nfes must be {rule}, got {bad}")
    if args.num_samples_per_class < 1 or args.batch_size < 1:
        raise ValueError("--num_samples_per_class and --batch_size must be integers >= 1")
    args.train_args = [a for a in args.train_args if a != "--"]
    if args.pipeline_dir is not None and args.train_args:
        raise ValueError("training arguments after -- apply only without --pipeline_dir")
    return args


def steps_for(sampler: str, nfe: int) -> int:
    """The `num_inference_steps` that makes `nfe` model evaluations."""
    return (nfe + 1) // 2 if sampler == "edm_heun" else nfe


def use_sampler(pipeline, original, sampler: str) -> dict:
    """Put `sampler`'s scheduler on the pipeline (built from its saved one, `original`); returns the extra
    arguments of its pipeline calls."""
    pipeline.scheduler = original
    if sampler in ("ddim", "ddim_eta0"):  # the saved MaskDM scheduler is DDIM with x0 clipping
        return {"eta": 1.0 if sampler == "ddim" else 0.0}
    if sampler == "dpmsolver_unclipped":
        from diffusers import DPMSolverMultistepScheduler

        pipeline.scheduler = DPMSolverMultistepScheduler.from_config(original.config)
        return {}
    sampling.set_scheduler(pipeline, sampler)
    return {}


def train_default(output_dir: str, train_args: list[str], script: str = "train_maskdit.py") -> float:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += [str(REPO / "examples" / script), "--output_dir", output_dir, *train_args]
    print(" ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
    return time.perf_counter() - start


def plot(rows: list[dict], floor: float, path: str, samplers: dict = SAMPLERS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for sampler, label in samplers.items():
        points = sorted((r["nfe"], r["fid"]) for r in rows if r["sampler"] == sampler)
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.axhline(floor, color="gray", linestyle=":", label="real held-out digits (floor)")
    if samplers is SAMPLERS:
        ax.axvline(TARGET_NFE, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("model evaluations (NFE)")
    ax.set_ylabel("digits-FID (lower is better)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    labels, _, script, _, _ = RECIPES[args.recipe]
    train_wall = None
    pipeline_dir = args.pipeline_dir
    if pipeline_dir is None:
        pipeline_dir = args.output_dir
        train_wall = train_default(pipeline_dir, args.train_args, script)
    pipeline = sampling.load_pipeline(pipeline_dir).to(args.device)
    pipeline.set_progress_bar_config(disable=True)
    original = pipeline.scheduler

    rows, floor = [], None
    for sampler in args.samplers:
        pipeline_kwargs = use_sampler(pipeline, original, sampler)
        for nfe in args.nfes:
            steps = steps_for(sampler, nfe)
            start = time.perf_counter()
            results = evaluate_pipeline_on_digits(
                pipeline,
                num_samples_per_class=args.num_samples_per_class,
                generator=torch.Generator(args.device).manual_seed(args.seed),
                guidance_scale=args.guidance_scale,
                num_inference_steps=steps,
                batch_size=args.batch_size,
                seed=args.seed,
                device=args.device,
                pipeline_kwargs=pipeline_kwargs,
            )
            floor = results["fid_floor"]
            rows.append(
                {
                    "sampler": sampler,
                    "nfe": nfe,
                    "num_inference_steps": steps,
                    "fid": results["fid"],
                    "accuracy": results["accuracy"],
                    "wall_time_s": round(time.perf_counter() - start, 2),
                }
            )
            print(f"{labels[sampler]:<30} NFE {nfe:>3}: FID {results['fid']:.2f}", flush=True)

    target = None
    heun = [r["fid"] for r in rows if r["sampler"] == "edm_heun" and r["nfe"] == 79]
    dpm = [r for r in rows if r["sampler"] == "edm_dpmsolver" and r["nfe"] <= TARGET_NFE]
    if heun and dpm:
        best = min(dpm, key=lambda r: r["fid"])
        target = {
            "heun_79_fid": heun[0],
            "best_dpmsolver_at_most_20_nfe": {"nfe": best["nfe"], "fid": best["fid"]},
            "ratio": best["fid"] / heun[0],
            "passed": best["fid"] <= (1 + TARGET_TOLERANCE) * heun[0],
        }

    record = {
        "recipe": args.recipe,
        "pipeline_dir": str(pipeline_dir),
        "trained_here": train_wall is not None,
        "train_wall_time_s": None if train_wall is None else round(train_wall, 1),
        "train_args": args.train_args,
        "num_samples_per_class": args.num_samples_per_class,
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
        "fid_floor": floor,
        "results": rows,
        "target": target,
        "machine": machine(args.device),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    plot(rows, floor, args.plot, labels)

    nfes = sorted({r["nfe"] for r in rows})
    fid = {(r["sampler"], r["nfe"]): r["fid"] for r in rows}
    print("\n| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
    print("|---|" + "---|" * len(nfes))
    for sampler in args.samplers:
        print(f"| {labels[sampler]} | " + " | ".join(f"{fid[sampler, n]:.2f}" for n in nfes) + " |")
    print(f"\nreal-vs-real floor at this sample size: {floor:.2f}")
    if target is not None:
        best = target["best_dpmsolver_at_most_20_nfe"]
        verdict = "PASS" if target["passed"] else "FAIL"
        print(
            f"target (DPM-Solver++ at <= {TARGET_NFE} NFE within {TARGET_TOLERANCE:.0%} of Heun at 79): {verdict}, "
            f"{best['fid']:.2f} at NFE {best['nfe']} vs {target['heun_79_fid']:.2f} ({target['ratio']:.3f}x)"
        )
    print(f"machine: {record['machine']}")
    print(f"wrote {args.output} and {args.plot}")
    return record


if __name__ == "__main__":
    main()
