"""Write the ImageNet-1k class names that converted pipelines carry as `id2label`.

Run once, with timm installed anywhere (it is not a dependency of this package):

    pip install --no-deps --target /tmp/timm timm && PYTHONPATH=/tmp/timm python scripts/make_imagenet_id2label.py

timm ships the 1000 WordNet ids in class-index order (sorted, as torchvision's ImageFolder numbers them and as
MaskDiT's and DiT's training data did) and each id's lemmas (``"tench, Tinca tinca"``); the pipeline accepts any
of the comma-separated names.
"""

import argparse
import json
from importlib.util import find_spec
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "src" / "diffusers_masked" / "imagenet_id2label.json"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="Where to write the JSON file.")
    args = parser.parse_args()

    # Located, not imported: timm's __init__ would import torchvision, which is not needed for two text files.
    spec = find_spec("timm")
    if spec is None:
        raise SystemExit("timm is not installed; see the module docstring")
    info = Path(spec.submodule_search_locations[0]) / "data" / "_info"
    synsets = info.joinpath("imagenet_synsets.txt").read_text().split()
    lemmas = dict(
        line.split("\t", 1) for line in info.joinpath("imagenet_synset_to_lemma.txt").read_text().splitlines()
    )
    if len(synsets) != 1000:
        raise ValueError(f"expected 1000 ImageNet-1k synsets from timm, got {len(synsets)}")
    id2label = {str(i): lemmas[wnid].strip() for i, wnid in enumerate(synsets)}
    args.output.write_text(json.dumps(id2label, indent=0, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(id2label)} class names to {args.output}")


if __name__ == "__main__":
    main()
