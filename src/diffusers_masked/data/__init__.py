"""Datasets for training and evaluating masked diffusion transformers.

Three sources, one shape: every loader returns a `datasets.Dataset` with an ``image`` column and, for
class-conditional data, a ``label`` column (a `datasets.ClassLabel`), together with ``id2label``.

- `load_digits_dataset`: scikit-learn's bundled 8×8 handwritten digits, upsampled. Offline, seconds to build;
  the default data of the training examples and the reference set of the offline FID.
- `load_image_dataset`: a Hub dataset (`datasets.load_dataset(name)`) or a local image folder whose
  sub-folders are the classes.
- `extract_latents`: the VAE posterior of every image, encoded once and cached on disk, as MaskDiT trains on
  ImageNet latents; `sample_latents` draws a fresh latent from it at every step.

Images are turned into tensors by `build_transforms` (PIL and numpy only; torchvision is not needed) and
batched by `make_preprocess` + `collate_fn`:

```python
dataset, id2label = load_digits_dataset(resolution=16)
transform = build_transforms(16, num_channels=1)
dataset = dataset.with_transform(make_preprocess(transform))
loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True, collate_fn=collate_fn)
batch = next(iter(loader))  # {"pixel_values": (64, 1, 16, 16) in [-1, 1], "class_labels": (64,) long}
```
"""

from .datasets import (
    DIGITS_ID2LABEL,
    DIGITS_SPLITS,
    load_digits_arrays,
    load_digits_dataset,
    load_image_dataset,
    verify_images,
)
from .images import ImageTransform, build_transforms, collate_fn, make_preprocess, open_image
from .latents import (
    FLIPPED_LATENT_COLUMNS,
    LATENT_COLUMNS,
    extract_latents,
    latent_cache_key,
    latent_collate_fn,
    sample_latents,
)

__all__ = [
    "DIGITS_ID2LABEL",
    "DIGITS_SPLITS",
    "FLIPPED_LATENT_COLUMNS",
    "LATENT_COLUMNS",
    "ImageTransform",
    "build_transforms",
    "collate_fn",
    "extract_latents",
    "latent_cache_key",
    "latent_collate_fn",
    "load_digits_arrays",
    "load_digits_dataset",
    "load_image_dataset",
    "make_preprocess",
    "open_image",
    "sample_latents",
    "verify_images",
]
