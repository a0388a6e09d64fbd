"""Convert an official MaskDM checkpoint (Lei et al. 2023) into a `MaskDMPipeline` folder.

    python scripts/convert_maskdm_to_diffusers.py --checkpoint pretrain_celebahq_m90block4_20.pt \\
        --output_dir maskdm-celebahq256 [--weights ema|model] [--push_to_hub org/name]

The file is read without running code (see `diffusers_masked.utils.safe_loading.load_torch_file`). See
docs/conversion.md.
"""

import argparse

from diffusers_masked.conversion import WEIGHTS, convert_maskdm_checkpoint
from diffusers_masked.training.arguments import int_at_least


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="The official .pt file ({step, model, opt, ema, scaler}).")
    parser.add_argument("--output_dir", required=True, help="Where to save the pipeline folder.")
    parser.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="ema",
        help="The averaged weights the official evaluation samples with, or the online ones (what fine-tuning starts "
        "from: pass the folder to examples/train_maskdm.py --pretrained_model_name_or_path).",
    )
    parser.add_argument(
        "--num_attention_heads",
        type=int_at_least(1),
        default=None,
        help="Heads, which the checkpoint does not store; default width / 64 (8 for MaskDM-S, 12 for MaskDM-B).",
    )
    parser.add_argument(
        "--push_to_hub", default=None, metavar="REPO_ID", help="Also upload the pipeline to this repo."
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    pipe = convert_maskdm_checkpoint(
        args.checkpoint, weights=args.weights, num_attention_heads=args.num_attention_heads
    )
    pipe.save_pretrained(args.output_dir)
    print(f"saved the pipeline to {args.output_dir}")
    if args.push_to_hub:
        pipe.push_to_hub(args.push_to_hub)
        print(f"pushed to {args.push_to_hub}")


if __name__ == "__main__":
    main()
