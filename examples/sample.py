"""Draw many samples from a saved MaskDiT or MaskDM pipeline, across processes, for FID and other evaluations.

    accelerate launch examples/sample.py --pipeline PATH_OR_ID --num_samples 50000 --output_dir samples/
    accelerate launch --num_processes 8 examples/sample.py --pipeline org/maskdit-xl2-256 --num_samples 50000 \
        --guidance_scale 1.5 --num_inference_steps 40 --batch_size 125 --output_dir samples/maskdit-cfg1.5
    python examples/evaluate_fid.py --samples samples/maskdit-cfg1.5/samples_50000x256x256x3.npz \
        --reference VIRTUAL_imagenet256_labeled.npz --inception_weights weights-inception-2015-12-05-6726825d.pth

Every sample has its own seed (``seed * 2**32 + index``) and, for class-conditional pipelines, the label
``index % num_classes`` (class-balanced; or ``--class_labels`` cycled), so the samples do not depend on the number
of processes. Finished shards of ``--shard_size`` samples are kept: run the same command again after a kill and it
goes on where it stopped. The result is ``samples_<N>x<H>x<W>x<C>.npz`` in ADM's reference-batch layout (``arr_0``
uint8 images, ``arr_1`` labels) and/or one PNG per sample under ``images/``. See docs/sampling-and-evaluation.md.
"""

import argparse
import inspect
import json
import logging
import math
from pathlib import Path

from diffusers_masked.evaluation import sampling
from diffusers_masked.utils.safe_loading import check_path_or_hub_id

logger = logging.getLogger("sample")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", required=True, help="A saved pipeline folder or a Hub repo id.")
    parser.add_argument("--output_dir", required=True, help="Where shards, images and the final .npz go.")
    parser.add_argument("--num_samples", type=int, default=50_000)
    parser.add_argument("--batch_size", type=int, default=64, help="Samples per pipeline call, per process.")
    parser.add_argument(
        "--shard_size",
        type=int,
        default=1000,
        help="Samples per shard: the unit that processes share and that a resumed run keeps.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Sample i is seeded with seed * 2**32 + i.")
    parser.add_argument(
        "--class_labels",
        default=None,
        help="Comma-separated class ids, cycled over the samples (default: every class in turn, class-balanced).",
    )
    parser.add_argument(
        "--prompts_file",
        default=None,
        help="Text-to-image pipelines: a text file of prompts, one per line, cycled over the samples (the .npz "
        "labels are prompt indices; the prompts are written beside it as prompts.json).",
    )
    parser.add_argument("--guidance_scale", type=float, default=None, help="Default: the pipeline's.")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="Default: the pipeline's.")
    parser.add_argument("--eta", type=float, default=None, help="MaskDMPipeline only: DDIM's noise weight in [0, 1].")
    parser.add_argument(
        "--scheduler",
        choices=sorted(sampling.SCHEDULERS),
        default=None,
        help="Swap the saved scheduler for one of the pipeline's parameterisation (edm_* for MaskDiT, ddim, ddpm or "
        "dpmsolver for MaskDM); default: the saved one.",
    )
    parser.add_argument("--output_format", choices=sampling.OUTPUT_FORMATS, default="npz")
    parser.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="Load a pipeline that is not one of ours (runs the repo's code; only for repos you trust), or skip the "
        "check of our own shims.",
    )
    return parser.parse_args(argv)


def validate_args(args) -> None:
    """Check the flags that need no pipeline, before anything is loaded."""
    for flag in ("num_samples", "batch_size", "shard_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be an integer >= 1, got {getattr(args, flag)}")
    if args.seed < 0:
        raise ValueError(f"--seed must be an integer >= 0, got {args.seed}")
    if args.num_samples > 2**32:
        raise ValueError(f"--num_samples must be at most 2**32 (per-sample seeds), got {args.num_samples}")
    if args.guidance_scale is not None and not (math.isfinite(args.guidance_scale) and args.guidance_scale >= 0):
        raise ValueError(f"--guidance_scale must be a finite number >= 0, got {args.guidance_scale}")
    if args.num_inference_steps is not None and args.num_inference_steps < 1:
        raise ValueError(f"--num_inference_steps must be an integer >= 1, got {args.num_inference_steps}")
    if args.eta is not None and not 0 <= args.eta <= 1:
        raise ValueError(f"--eta must be a number in [0, 1], got {args.eta}")
    if args.class_labels is not None:
        try:
            args.class_labels = [int(x) for x in args.class_labels.split(",")]
        except ValueError:
            raise ValueError(
                f"--class_labels must be comma-separated integer ids, got {args.class_labels!r}"
            ) from None
    if args.prompts_file is not None:
        if args.class_labels is not None:
            raise ValueError("pass --class_labels or --prompts_file, not both")
        try:
            lines = open(args.prompts_file, encoding="utf-8").read().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"--prompts_file {args.prompts_file}: cannot read it ({err})") from None
        args.prompts = [line.strip() for line in lines if line.strip()]
        if not args.prompts:
            raise ValueError(f"--prompts_file {args.prompts_file} holds no prompt (one per line)")
    else:
        args.prompts = None
    check_path_or_hub_id(args.pipeline, "--pipeline")


def validate_for_pipeline(args, pipeline) -> dict:
    """Check the flags that depend on the pipeline; return the keyword arguments of its calls."""
    num_classes = sampling.pipeline_num_classes(pipeline)
    # Ours say whether their transformer takes text; a stock pipeline does if its call takes a prompt (PixArt).
    text = getattr(pipeline, "is_text_conditioned", None)
    if text is None:
        text = "prompt" in inspect.signature(pipeline.__call__).parameters
    if text and args.prompts is None:
        raise ValueError(f"{type(pipeline).__name__} is text-to-image: pass --prompts_file")
    if args.prompts is not None and not text:
        raise ValueError(f"--prompts_file was given but {type(pipeline).__name__} takes no prompt")
    if args.class_labels is not None:
        if num_classes == 0:
            raise ValueError("--class_labels was given but the pipeline is unconditional (num_classes=0)")
        wrong = [label for label in args.class_labels if not 0 <= label < num_classes]
        if wrong:
            raise ValueError(f"--class_labels must be ids in [0, {num_classes}), got {wrong}")
    if num_classes == 0 and not text and args.guidance_scale not in (None, 1.0):
        raise ValueError("--guidance_scale applies to class-conditional pipelines only; this one is unconditional")
    if args.scheduler is not None:
        # The pipeline's own check (MaskedDiffusionPipeline.check_scheduler), asked before anything is swapped.
        allowed = sampling.compatible_scheduler_names(pipeline)
        if args.scheduler not in allowed:
            raise ValueError(
                f"--scheduler for a {type(pipeline).__name__} must be one of {allowed}, got {args.scheduler!r}"
            )
    parameters = inspect.signature(pipeline.__call__).parameters
    if args.eta is not None and "eta" not in parameters:
        raise ValueError(
            f"--eta applies to pipelines whose call takes eta (MaskDMPipeline), not {type(pipeline).__name__}"
        )
    kwargs = {}
    for name in ("guidance_scale", "num_inference_steps", "eta"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    return kwargs


def main(argv=None):
    args = parse_args(argv)
    validate_args(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from diffusers_masked.training.distributed import check_distributed_launch

    state = Accelerator()
    # Without this check, a launch that accelerate does not distribute would have every process draw every shard.
    check_distributed_launch(state)
    # The main process loads first: loading a pipeline with its own code copies that code into diffusers' module
    # cache, and two processes writing the same file at once can each import it half-written.
    with state.main_process_first():
        pipeline = sampling.load_pipeline(args.pipeline, trust_remote_code=args.trust_remote_code)
    pipeline_kwargs = validate_for_pipeline(args, pipeline)
    if args.scheduler is not None:
        sampling.set_scheduler(pipeline, args.scheduler)
    pipeline = pipeline.to(state.device)
    pipeline.set_progress_bar_config(disable=True)
    num_classes = sampling.pipeline_num_classes(pipeline)

    config = {
        "pipeline": str(args.pipeline),
        "seed": args.seed,
        "shard_size": args.shard_size,
        "class_labels": args.class_labels,
        "prompts": args.prompts,
        "num_classes": num_classes,
        "output_format": args.output_format,
        "pipeline_kwargs": pipeline_kwargs,
        "scheduler": type(pipeline.scheduler).__name__,
        "num_samples": args.num_samples,
        "batch_size": args.batch_size,
    }
    problem = sampling.check_resume(args.output_dir, config)
    if problem is not None:
        raise ValueError(problem)
    state.wait_for_everyone()  # every rank has read the old settings before the main process replaces them
    if state.is_main_process:
        sampling.write_config(args.output_dir, config)
    state.wait_for_everyone()
    pending = sampling.pending_shards(args.output_dir, args.num_samples, args.shard_size)
    state.wait_for_everyone()  # every rank has listed the pending shards before any is written
    ranges = sampling.shard_ranges(args.num_samples, args.shard_size)
    mine = pending[state.process_index :: state.num_processes]
    done = len(ranges) - len(pending)
    if state.is_main_process and done:
        logger.info(f"resuming: {done} of {len(ranges)} shards are finished and kept")

    progress = tqdm(
        total=sum(len(ranges[k]) for k in mine),
        unit="img",
        desc=f"process {state.process_index}/{state.num_processes}",
        disable=not state.is_main_process,
    )
    for shard in mine:
        sampling.sample_shard(
            pipeline,
            args.output_dir,
            shard,
            ranges[shard],
            seed=args.seed,
            batch_size=args.batch_size,
            num_classes=num_classes,
            class_labels=args.class_labels,
            output_format=args.output_format,
            pipeline_kwargs=pipeline_kwargs,
            on_batch=progress.update,
            prompts=args.prompts,
        )
    progress.close()
    state.wait_for_everyone()
    if state.is_main_process:
        summary = {"output_dir": args.output_dir, "num_samples": args.num_samples}
        if args.output_format in ("npz", "both"):
            summary["npz"] = str(sampling.assemble_npz(args.output_dir, args.num_samples, args.shard_size))
        if args.prompts is not None:
            from diffusers_masked.utils.io import atomic_write_text

            atomic_write_text(Path(args.output_dir) / "prompts.json", json.dumps(args.prompts, indent=1))
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
