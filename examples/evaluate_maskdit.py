"""Evaluate a saved class-conditional digits pipeline: FID against the real digits, the FID floor, sample accuracy.

    python examples/evaluate_maskdit.py --pipeline_dir out/maskdit-digits
    python examples/evaluate_maskdit.py --pipeline_dir out/maskdit-digits --num_samples_per_class 100 \
        --feature_extractor inception --inception_weights /path/to/weights-inception-2015-12-05-6726825d.pth \
        --output_json out/maskdit-digits/eval.json

Runs offline with the default digits feature extractor (see docs/data-and-evaluation.md).
"""

import argparse
import json
import logging
from pathlib import Path

import torch

from diffusers_masked.evaluation import evaluate_pipeline_on_digits
from diffusers_masked.utils.safe_loading import check_path_or_hub_id


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline_dir", required=True, help="Folder written by pipeline.save_pretrained.")
    parser.add_argument(
        "--num_samples_per_class",
        type=int,
        default=36,
        help="Samples generated per digit; 36 matches the 360 held-out digits used for the FID floor.",
    )
    parser.add_argument("--feature_extractor", choices=("digits", "inception"), default="digits")
    parser.add_argument(
        "--inception_weights",
        default=None,
        help="Local torch-fidelity Inception-v3 weights (.pth) for --feature_extractor inception.",
    )
    parser.add_argument(
        "--allow_download", action="store_true", help="Let torch-fidelity download the Inception weights if missing."
    )
    parser.add_argument("--guidance_scale", type=float, default=1.5)
    parser.add_argument("--num_inference_steps", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=64, help="Samples per pipeline call.")
    parser.add_argument("--seed", type=int, default=0, help="Seeds sampling, the held-out subset and the classifier.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--cache_dir", default=None, help="Digits classifier cache (default ~/.cache/diffusers_masked)."
    )
    parser.add_argument("--output_json", default=None, help="Write the results here as JSON.")
    return parser.parse_args(argv)


def load_pipeline(pipeline_dir: str):
    """Load a saved `MaskDiTPipeline` folder (or Hub id); every code file is checked to be our shims, so no
    `trust_remote_code` is needed."""
    from diffusers_masked import MaskDiTPipeline

    return MaskDiTPipeline.from_pretrained(pipeline_dir)


def format_table(results: dict) -> str:
    rows = [
        ("FID (samples vs real)", results["fid"]),
        ("FID floor (held-out real vs real)", results["fid_floor"]),
        ("class accuracy of samples", results["accuracy"]),
        ("classifier accuracy on real held-out", results["classifier_heldout_accuracy"]),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  --------"]
    lines += [f"{name.ljust(width)}  {'n/a' if value is None else f'{value:.4f}'}" for name, value in rows]
    lines.append(
        f"({results['num_fake']} samples, {results['num_real']} real, {results['num_heldout']} held-out; "
        f"{results['feature_extractor']} features, {results['resolution']}x{results['resolution']})"
    )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_path_or_hub_id(args.pipeline_dir, "--pipeline_dir")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    pipeline = load_pipeline(args.pipeline_dir).to(args.device)
    pipeline.set_progress_bar_config(disable=True)
    results = evaluate_pipeline_on_digits(
        pipeline,
        num_samples_per_class=args.num_samples_per_class,
        generator=torch.Generator(args.device).manual_seed(args.seed),
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.num_inference_steps,
        batch_size=args.batch_size,
        feature_extractor=args.feature_extractor,
        seed=args.seed,
        device=args.device,
        cache_dir=args.cache_dir,
        inception_weights_path=args.inception_weights,
        allow_download=args.allow_download,
    )
    results["pipeline_dir"] = str(args.pipeline_dir)
    print(format_table(results))
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(results, indent=2, sort_keys=True))
    return results


if __name__ == "__main__":
    main()
