#!/usr/bin/env python
"""Run a built-in default (`accelerate launch examples/train_maskdit.py` or `train_maskdm.py` with no arguments)
and report its wall time and evaluation: digits-FID against the real train split, the real-vs-real held-out floor,
and (MaskDiT, class-conditional) the share of samples the digits classifier assigns to the requested class.

    python benchmarks/default_run.py [--output_dir /tmp/maskdit-digits] [--output benchmarks/results/default_run.json]
    python benchmarks/default_run.py --recipe maskdm    # writes benchmarks/results/maskdm_default_run.json
    python benchmarks/default_run.py --recipe text      # train_text_to_image.py: benchmarks/results/text_to_image.json

Extra arguments after `--` are passed to the training script (e.g. `-- --max_train_steps 500` for a quick look).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this script, also when loaded by path
from harness.report import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    # script, default output folder and JSON, the config keys that size the run
    "maskdit": ("train_maskdit.py", "maskdit-digits", "default_run.json", ("max_train_steps", "unmask_tuning_steps")),
    "maskdm": ("train_maskdm.py", "maskdm-digits", "maskdm_default_run.json", ("max_train_steps", "finetune_steps")),
    "text": ("train_text_to_image.py", "t2i-digits", "text_to_image.json", ("max_train_steps", "unmask_tuning_steps")),
}
# The text default's prompt-control figures, kept as the evaluation wrote them.
TEXT_METRICS = (
    "prompt_template",
    "mean_ink_bold",
    "mean_ink_thin",
    "ink_difference",
    "bold_heavier_share",
    "num_pairs",
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=tuple(RECIPES), default="maskdit", help="Which training script's default.")
    parser.add_argument("--output_dir", default=None, help="Default: benchmarks/results/<maskdit|maskdm>-digits.")
    parser.add_argument("--output", default=None, help="Default: benchmarks/results/[maskdm_]default_run.json.")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: passed to the training script")
    args = parser.parse_args()
    extra = [a for a in args.train_args if a != "--"]
    script, folder, json_name, size_keys = RECIPES[args.recipe]
    args.output_dir = args.output_dir or str(REPO / "benchmarks" / "results" / folder)
    args.output = args.output or str(REPO / "benchmarks" / "results" / json_name)

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += [str(REPO / "examples" / script), "--output_dir", args.output_dir, *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    print(" ".join(cmd), flush=True)
    load_before = os.getloadavg()
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    wall = time.perf_counter() - start
    load_after = os.getloadavg()

    out = Path(args.output_dir)
    metrics = json.loads((out / "eval_results.json").read_text())
    config = json.loads((out / "training_config.json").read_text())
    record = {
        "command": f"accelerate launch examples/{script}" + ("" if not extra else " " + " ".join(extra)),
        "wall_time_s": round(wall, 1),
        "fid_vs_train": metrics.get("fid"),
        "fid_floor_heldout": metrics.get("fid_floor"),
        "accuracy": metrics.get("accuracy"),
        "classifier_heldout_accuracy": metrics.get("classifier_heldout_accuracy"),
        "num_samples": metrics.get("num_fake"),
        "num_inference_steps": metrics.get("num_inference_steps"),
        **{key: config[key] for key in size_keys},
        "train_batch_size": config["train_batch_size"],
        **{key: metrics[key] for key in TEXT_METRICS if key in metrics},
        "machine": {
            **machine(),
            # Other work on the machine inflates the wall time; a load above the core count means it was shared.
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in load_after],
        },
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    rows = [
        ("wall time", f"{wall / 60:.1f} min"),
        ("digits-FID vs train split", f"{record['fid_vs_train']:.2f}"),
        ("FID floor (held-out real vs train)", f"{record['fid_floor_heldout']:.2f}"),
    ]
    if record["accuracy"] is not None:  # class- and text-conditional runs only
        rows += [
            ("samples classified as requested", f"{100 * record['accuracy']:.1f}%"),
            ("classifier held-out accuracy", f"{100 * record['classifier_heldout_accuracy']:.1f}%"),
        ]
    if "bold_heavier_share" in record:
        rows += [
            ("bold/thin pairs with the bold one heavier", f"{100 * record['bold_heavier_share']:.1f}%"),
            ("mean ink bold vs thin", f"{record['mean_ink_bold']:.3f} vs {record['mean_ink_thin']:.3f}"),
        ]
    width = max(len(name) for name, _ in rows)
    print("\n| metric | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
