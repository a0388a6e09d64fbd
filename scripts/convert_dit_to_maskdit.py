"""Initialise a MaskDiT transformer's encoder from a diffusers DiT (e.g. facebook/DiT-XL-2-256), for masked
fine-tuning.

    python scripts/convert_dit_to_maskdit.py --pretrained_model_name_or_path facebook/DiT-XL-2-256 \\
        --output_dir maskdit-from-dit-xl-2-256 --decoder_num_layers 8

The output folder loads with `MaskedDiTTransformer2DModel.from_pretrained`. See docs/conversion.md.
"""

import argparse

from diffusers import DiTTransformer2DModel

from diffusers_masked.conversion import convert_dit_transformer
from diffusers_masked.models.masked_dit import MASKDIT_DECODER
from diffusers_masked.training.arguments import int_at_least
from diffusers_masked.utils.safe_loading import check_model_folder


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="A DiT pipeline's Hub id or folder.")
    parser.add_argument(
        "--subfolder",
        default="transformer",
        help="The DiT's folder inside it ('transformer' in a pipeline); pass '' for a bare model folder.",
    )
    parser.add_argument("--output_dir", required=True, help="Where to save the converted transformer.")
    parser.add_argument(
        "--decoder_num_layers",
        type=int_at_least(0),
        default=MASKDIT_DECODER["decoder_num_layers"],
        help="Depth of the new decoder (MaskDiT: 8); 0 for none, which keeps DiT's final layer.",
    )
    parser.add_argument(
        "--decoder_num_attention_heads", type=int_at_least(1), default=MASKDIT_DECODER["decoder_num_attention_heads"]
    )
    parser.add_argument(
        "--decoder_attention_head_dim", type=int_at_least(1), default=MASKDIT_DECODER["decoder_attention_head_dim"]
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # A local folder must hold a diffusers DiT (not, say, a MaskDiT pipeline) before anything is loaded.
    check_model_folder(
        args.pretrained_model_name_or_path,
        "DiTTransformer2DModel",
        args.subfolder or None,
        name="--pretrained_model_name_or_path",
        subfolder_name="--subfolder",
    )
    dit = DiTTransformer2DModel.from_pretrained(args.pretrained_model_name_or_path, subfolder=args.subfolder or None)
    model = convert_dit_transformer(
        dit,
        decoder_num_layers=args.decoder_num_layers,
        decoder_num_attention_heads=args.decoder_num_attention_heads,
        decoder_attention_head_dim=args.decoder_attention_head_dim,
    )
    model.save_pretrained(args.output_dir)
    print(f"saved the transformer to {args.output_dir}")


if __name__ == "__main__":
    main()
