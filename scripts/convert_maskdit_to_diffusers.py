"""Convert an official MaskDiT checkpoint (Zheng et al. 2023) into a `MaskDiTPipeline` folder.

    python scripts/convert_maskdit_to_diffusers.py --checkpoint imagenet256-ckpt-best_with_guidance.pt \\
        --vae autoencoder_kl.pth --output_dir maskdit-imagenet256

The file is read without running code (see `diffusers_masked.utils.safe_loading.load_torch_file`). See
docs/conversion.md.
"""

import argparse
from pathlib import Path

from diffusers_masked.conversion import WEIGHTS, convert_maskdit_checkpoint, load_vae
from diffusers_masked.training.arguments import int_at_least
from diffusers_masked.utils.safe_loading import no_such_path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="The official .pt file (or a .safetensors state dict).")
    parser.add_argument("--output_dir", required=True, help="Where to save the pipeline folder.")
    parser.add_argument(
        "--push_to_hub", default=None, metavar="REPO_ID", help="Also upload the pipeline to this repo."
    )
    parser.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="ema",
        help="The averaged weights the paper samples with, or the online ones.",
    )
    parser.add_argument(
        "--vae",
        required=True,
        help="The autoencoder: the official autoencoder_kl.pth (an LDM-format file), or a diffusers folder or Hub id.",
    )
    parser.add_argument("--vae_subfolder", default=None, help="Folder of the VAE inside a Hub repo, e.g. 'vae'.")
    parser.add_argument(
        "--vae_config",
        default=None,
        help="For a single-file VAE: a diffusers config (folder or Hub id) describing it.",
    )
    parser.add_argument(
        "--num_attention_heads",
        type=int_at_least(1),
        default=None,
        help="Encoder heads, which the weights do not store. Default: from the model type a training checkpoint "
        "records, else from the DiT size of the width (S 384: 6, B 768: 12, L 1024: 16, XL 1152: 16); another width "
        "needs this flag.",
    )
    parser.add_argument(
        "--decoder_num_attention_heads",
        type=int_at_least(1),
        default=None,
        help="Decoder heads; default 16, the official 512-wide decoder's.",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not Path(args.checkpoint).exists():
        raise ValueError(no_such_path(args.checkpoint, "--checkpoint"))
    vae = load_vae(args.vae, subfolder=args.vae_subfolder, config=args.vae_config)
    pipe = convert_maskdit_checkpoint(
        args.checkpoint,
        vae=vae,
        weights=args.weights,
        num_attention_heads=args.num_attention_heads,
        decoder_num_attention_heads=args.decoder_num_attention_heads,
    )
    pipe.save_pretrained(args.output_dir)
    print(f"saved the pipeline to {args.output_dir}")
    if args.push_to_hub:
        pipe.push_to_hub(args.push_to_hub)
        print(f"pushed to {args.push_to_hub}")


if __name__ == "__main__":
    main()
