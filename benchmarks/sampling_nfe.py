#!/usr/bin/env python
"""Digits-FID against the number of model evaluations (NFE) for EDM Heun, EDM Euler and EDM DPM-Solver++ (2M),
on a MaskDiT trained with the built-in default recipe (or a given pipeline folder).

    python benchmarks/sampling_nfe.py                                  # trains the default recipe first
    python benchmarks/sampling_nfe.py --pipeline_dir maskdit-digits    # an existing digits pipeline
    python benchmarks/sampling_nfe.py -- --max_train_steps 500         # after --: passed to train_maskdit.py

Heun's N steps cost 2N - 1 evaluations, Euler's and DPM-Solver's N. Every sampler and NFE draws the same samples'
worth of starting noise (the same seed) and is scored by `evaluate_pipeline_on_digits` (36 samples per class, the
real-vs-real floor at that size alongside). Target: DPM-Solver++ at 20 NFE or fewer within 5% of Heun's FID at 79.
Prints a table, writes JSON and a PNG plot into benchmarks/results/.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _machine.py beside this script, also when loaded by path
from _machine import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLERS = {"edm_heun": "EDM Heun", "edm_euler": "EDM Euler", "edm_dpmsolver": "EDM DPM-Solver++ (2M)"}
# Odd, so that Heun (2N - 1 evaluations) reaches each one exactly.
DEFAULT_NFES = [5, 7, 9, 11, 15, 19, 25, 35, 49, 79]
TARGET_NFE, TARGET_TOLERANCE = 20, 0.05


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline_dir", default=None, help="A saved digits MaskDiTPipeline; default: train one.")
    parser.add_argument("--output_dir", default=str(REPO / "benchmarks" / "results" / "maskdit-digits-nfe"))
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "sampling_nfe.json"))
    parser.add_argument("--plot", default=str(REPO / "benchmarks" / "results" / "sampling_nfe.png"))
    parser.add_argument("--nfes", type=int, nargs="+", default=DEFAULT_NFES, help="Odd numbers from 3 (Heun).")
    parser.add_argument("--samplers", nargs="+", choices=sorted(SAMPLERS), default=list(SAMPLERS))
    parser.add_argument("--num_samples_per_class", type=int, default=36)
    parser.add_argument("--guidance_scale", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=120)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: passed to train_maskdit.py")
    args = parser.parse_args(argv)
    bad = [n for n in args.nfes if n < 3 or n % 2 == 0]
    if bad:
        raise ValueError(f"--nfes must be odd numbers >= 3 (Heun's N steps make 2N - 1 evaluations), got {bad}")
    if args.num_samples_per_class < 1 or args.batch_size < 1:
        raise ValueError("--num_samples_per_class and --batch_size must be integers >= 1")
    args.train_args = [a for a in args.train_args if a != "--"]
    if args.pipeline_dir is not None and args.train_args:
        raise ValueError("training arguments after -- apply only without --pipeline_dir")
    return args


def steps_for(sampler: str, nfe: int) -> int:
    """The `num_inference_steps` that makes `nfe` model evaluations."""
    return (nfe + 1) // 2 if sampler == "edm_heun" else nfe


def train_default(output_dir: str, train_args: list[str]) -> float:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += [str(REPO / "examples" / "train_maskdit.py"), "--output_dir", output_dir, *train_args]
    print(" ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
    return time.perf_counter() - start


def plot(rows: list[dict], floor: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for sampler, label in SAMPLERS.items():
        points = sorted((r["nfe"], r["fid"]) for r in rows if r["sampler"] == sampler)
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.axhline(floor, color="gray", linestyle=":", label="real held-out digits (floor)")
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
    train_wall = None
    pipeline_dir = args.pipeline_dir
    if pipeline_dir is None:
        pipeline_dir = args.output_dir
        train_wall = train_default(pipeline_dir, args.train_args)
    pipeline = sampling.load_pipeline(pipeline_dir).to(args.device)
    pipeline.set_progress_bar_config(disable=True)
    original = pipeline.scheduler

    rows, floor = [], None
    for sampler in args.samplers:
        pipeline.scheduler = original
        sampling.set_scheduler(pipeline, sampler)
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
            print(f"{SAMPLERS[sampler]:<24} NFE {nfe:>3}: FID {results['fid']:.2f}", flush=True)

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
    plot(rows, floor, args.plot)

    nfes = sorted({r["nfe"] for r in rows})
    fid = {(r["sampler"], r["nfe"]): r["fid"] for r in rows}
    print("\n| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
    print("|---|" + "---|" * len(nfes))
    for sampler in args.samplers:
        print(f"| {SAMPLERS[sampler]} | " + " | ".join(f"{fid[sampler, n]:.2f}" for n in nfes) + " |")
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
