"""FID (and Inception Score) of sample files against real data: reference statistics, a reference batch, an image
folder or a `datasets` dataset.

    python examples/evaluate_fid.py --samples samples/samples_50000x256x256x3.npz \
        --reference VIRTUAL_imagenet256_labeled.npz --inception_weights weights-inception-2015-12-05-6726825d.pth
    python examples/evaluate_fid.py --samples samples/images --reference_dataset imagenet-1k --reference_split \
        validation --allow_download --output_json samples/fid.json
    python examples/evaluate_fid.py --samples samples/images --reference real_images/ --feature_extractor digits
    python examples/evaluate_fid.py --reference real_images/ --save_reference_statistics real_stats.npz

It reads what examples/sample.py writes (the .npz or the PNG folder) and works on files only; to sample and evaluate
a digits pipeline in one go (with the real-vs-real floor and class accuracy) use examples/evaluate_maskdit.py.
Nothing is downloaded unless --allow_download is given. See docs/sampling-and-evaluation.md.
"""

import argparse
import json
import logging
from pathlib import Path

import torch

from diffusers_masked.evaluation import evaluate_samples, reference_statistics
from diffusers_masked.utils.safe_loading import check_path_or_hub_id, no_such_path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", default=None, help="A sample .npz (arr_0: uint8 NHWC) or a folder of images.")
    parser.add_argument(
        "--reference",
        default=None,
        help="An .npz of reference statistics (mu, sigma) or of a reference batch (arr_0), or a folder of real "
        "images.",
    )
    parser.add_argument("--reference_dataset", default=None, help="A `datasets` dataset (Hub id or local path).")
    parser.add_argument("--reference_config", default=None, help="The dataset's configuration name.")
    parser.add_argument("--reference_split", default="train")
    parser.add_argument("--reference_image_column", default="image")
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Side the real images are center-cropped and resized to (default: the samples').",
    )
    parser.add_argument("--feature_extractor", choices=("inception", "digits"), default="inception")
    parser.add_argument("--inception_weights", default=None, help="Local torch-fidelity Inception-v3 weights (.pth).")
    parser.add_argument(
        "--allow_download", action="store_true", help="Let torch-fidelity download the Inception weights if missing."
    )
    parser.add_argument("--inception_score_splits", type=int, default=10, help="0 skips the Inception Score.")
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--cache_dir", default=None, help="Cache of reference statistics (default ~/.cache/diffusers_masked)."
    )
    parser.add_argument(
        "--save_reference_statistics",
        default=None,
        help="Also write the reference statistics here (ADM's mu/sigma layout), e.g. to evaluate elsewhere offline.",
    )
    parser.add_argument(
        "--clip_model",
        default=None,
        help="Text-to-image samples: also their CLIP score against their prompts (torchmetrics' CLIPScore) with this "
        "CLIP model (a folder, or a Hub id with --allow_download, e.g. openai/clip-vit-large-patch14).",
    )
    parser.add_argument(
        "--prompts", default=None, help="The samples' prompts (default: prompts.json beside the .npz, from sample.py)."
    )
    parser.add_argument("--output_json", default=None, help="Write the results here as JSON.")
    return parser.parse_args(argv)


def validate_args(args) -> None:
    if args.reference is not None and args.reference_dataset is not None:
        raise ValueError("give at most one of --reference (an .npz or an image folder) or --reference_dataset")
    if args.reference is None and args.reference_dataset is None and args.clip_model is None:
        raise ValueError(
            "give one of --reference (an .npz or an image folder) or --reference_dataset (or only --clip_model for "
            "the CLIP score alone)"
        )
    if args.samples is None and args.save_reference_statistics is None:
        raise ValueError("give --samples to evaluate, or --save_reference_statistics to only compute the reference")
    for flag in ("samples", "reference"):
        value = getattr(args, flag)
        if value is not None and not Path(value).exists():
            raise ValueError(no_such_path(value, f"--{flag}"))
    check_path_or_hub_id(args.reference_dataset, "--reference_dataset")
    if args.samples is None and args.reference_dataset is not None and args.resolution is None:
        raise ValueError("--reference_dataset without --samples needs --resolution (the side to prepare images at)")
    if args.resolution is not None and args.resolution < 1:
        raise ValueError(f"--resolution must be an integer >= 1, got {args.resolution}")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be an integer >= 1, got {args.batch_size}")
    if args.inception_score_splits < 0:
        raise ValueError(f"--inception_score_splits must be an integer >= 0, got {args.inception_score_splits}")
    if args.inception_weights is not None and not Path(args.inception_weights).is_file():
        raise ValueError(f"--inception_weights {args.inception_weights!r} is not a file")
    if args.clip_model is not None:
        if args.samples is None or not str(args.samples).endswith(".npz"):
            raise ValueError("--clip_model needs --samples as sample.py's .npz (its labels index the prompts)")
        args.prompts = args.prompts or str(Path(args.samples).parent / "prompts.json")
        if not Path(args.prompts).is_file():
            raise ValueError(no_such_path(args.prompts, "--prompts") + " (sample.py writes prompts.json)")


def clip_score_of(args) -> float:
    """The CLIP score of sample.py's .npz against its prompts (``arr_1`` holds each sample's prompt index)."""
    import numpy as np

    from diffusers_masked.evaluation.clip import clip_score
    from diffusers_masked.utils.safe_loading import read_json

    prompts = read_json(args.prompts, "--prompts")
    with np.load(args.samples) as arrays:
        images, indices = arrays["arr_0"], arrays["arr_1"]
    return clip_score(
        images,
        [prompts[int(i)] for i in indices],
        args.clip_model,
        device=args.device,
        allow_download=args.allow_download,
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    validate_args(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    common = dict(
        feature_extractor=args.feature_extractor,
        batch_size=args.batch_size,
        device=args.device,
        cache_dir=args.cache_dir,
        inception_weights_path=args.inception_weights,
        allow_download=args.allow_download,
    )
    source = dict(
        dataset_name=args.reference_dataset,
        dataset_config_name=args.reference_config,
        split=args.reference_split,
        image_column=args.reference_image_column,
    )
    reference = args.reference
    if args.save_reference_statistics is not None or args.resolution is not None:
        reference = reference_statistics(reference, resolution=args.resolution, **source, **common)
        if args.save_reference_statistics is not None:
            reference.save(args.save_reference_statistics)
            print(f"wrote {args.save_reference_statistics} ({reference.num_images} images)")
        source = {}
    if args.samples is None:
        return {}
    splits = args.inception_score_splits or None
    results = {}
    if reference is not None or source.get("dataset_name"):
        results = evaluate_samples(args.samples, reference, inception_score_splits=splits, **source, **common)
        results.update(reference=str(args.reference or args.reference_dataset))
    results["samples"] = str(args.samples)
    if args.clip_model is not None:
        results["clip_score"] = clip_score_of(args)
        results["clip_model"] = str(args.clip_model)
    for name in ("fid", "inception_score", "clip_score"):
        if results.get(name) is not None:
            print(f"{name}: {results[name]:.4f}")
    if "num_samples" in results:
        print(
            f"({results['num_samples']} samples, {results['num_reference'] or 'unknown'} reference images; "
            f"{results['feature_extractor']} features)"
        )
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return results


if __name__ == "__main__":
    main()
