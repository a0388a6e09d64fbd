"""Where the images come from: scikit-learn's bundled digits, a Hub dataset, or a local image folder whose
sub-folders are the classes; each as a `datasets.Dataset` with an ``image`` column and, for class-conditional data, a
``label`` column (a `datasets.ClassLabel`), together with ``id2label``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import PIL.Image

from ..utils.safe_loading import check_path_or_hub_id, no_such_path
from .images import open_image

DIGITS_ID2LABEL = {i: str(i) for i in range(10)}
DIGITS_SPLITS = ("train", "heldout")


# Files imagefolder reads labels beside: with one of them the labels need not come from sub-folders.
_IMAGEFOLDER_METADATA = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


def load_digits_arrays(
    resolution: int = 16, seed: int = 0, holdout_fraction: float = 0.0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The digits of `load_digits_dataset` as numpy arrays, without building a `datasets.Dataset`.

    Returns:
        `dict`: ``{"train": (images, labels)}``, plus ``"heldout"`` when ``holdout_fraction > 0``; ``images`` is
        ``(N, resolution, resolution)`` uint8, ``labels`` ``(N,)`` int64. Same images, order and split as
        `load_digits_dataset` with the same arguments.
    """
    from sklearn.datasets import load_digits

    if resolution < 8:
        raise ValueError(f"resolution must be at least 8 (the digits are 8x8), got {resolution}")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    labels = digits.target.astype(np.int64)
    images = np.stack(
        [
            np.asarray(PIL.Image.fromarray(p).resize((resolution, resolution), PIL.Image.Resampling.BICUBIC))
            for p in pixels
        ]
    )

    if holdout_fraction == 0.0:
        return {"train": (images, labels)}
    from sklearn.model_selection import train_test_split

    train_idx, heldout_idx = train_test_split(
        np.arange(len(labels)), test_size=holdout_fraction, stratify=labels, random_state=seed
    )
    return {
        name: (images[np.sort(idx)], labels[np.sort(idx)])
        for name, idx in zip(DIGITS_SPLITS, (train_idx, heldout_idx))
    }


def load_digits_dataset(
    resolution: int = 16,
    split: str | None = None,
    seed: int = 0,
    holdout_fraction: float = 0.0,
):
    """scikit-learn's handwritten digits as a `datasets.Dataset` of upsampled grayscale images.

    The 1,797 images of `sklearn.datasets.load_digits` (8×8, values 0..16, classes 0..9) are mapped linearly to
    0..255 (``round(v * 255 / 16)``) and upsampled to ``resolution × resolution`` with PIL's **bicubic**
    filter (values clipped to 0..255), which keeps the strokes smooth rather than blocky. Nothing is
    downloaded: the digits ship inside scikit-learn.

    Args:
        resolution (`int`, defaults to 16): side of the square output images, in pixels (at least 8).
        split (`str`, *optional*): ``"train"`` or ``"heldout"`` to get one part of the split; `None` for all of
            it (a `datasets.DatasetDict` with both parts when ``holdout_fraction > 0``).
        seed (`int`, defaults to 0): seed of the split. The same ``(seed, holdout_fraction)`` always gives the
            same images in the same order.
        holdout_fraction (`float`, defaults to 0.0): share of the images kept out of ``"train"``, stratified by
            class (each digit keeps the same share). Held-out images give an FID floor (real vs real) and the
            digits classifier's accuracy. With 0.0 the whole set is ``"train"``.

    Returns:
        `tuple`: ``(dataset, id2label)``. ``dataset`` is a `datasets.Dataset` (or a `datasets.DatasetDict` with
        ``"train"`` and ``"heldout"``) with columns ``image`` (PIL, mode ``"L"``) and ``label``
        (`datasets.ClassLabel`, names ``"0"`` to ``"9"``); ``id2label`` maps ``0..9`` to ``"0".."9"``.
    """
    import datasets

    if split is not None and split not in DIGITS_SPLITS:
        raise ValueError(f"split must be one of {DIGITS_SPLITS} or None, got {split!r}")
    if split == "heldout" and holdout_fraction == 0.0:
        raise ValueError("split='heldout' needs holdout_fraction > 0")
    arrays = load_digits_arrays(resolution, seed=seed, holdout_fraction=holdout_fraction)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(DIGITS_ID2LABEL.values()))}
    )

    def build(images, labels):
        rows = {"image": [PIL.Image.fromarray(image) for image in images], "label": labels.tolist()}
        return datasets.Dataset.from_dict(rows, features=features)

    if split is not None:
        return build(*arrays[split]), dict(DIGITS_ID2LABEL)
    if len(arrays) == 1:
        return build(*arrays["train"]), dict(DIGITS_ID2LABEL)
    return datasets.DatasetDict({name: build(*parts) for name, parts in arrays.items()}), dict(DIGITS_ID2LABEL)


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | os.PathLike | None = None,
    image_column: str = "image",
    label_column: str | None = "label",
    cache_dir: str | os.PathLike | None = None,
    split: str = "train",
    caption_column: str | None = None,
):
    """Load a Hub dataset or a local image folder for training.

    Give exactly one source: ``dataset_name`` (anything `datasets.load_dataset` accepts: a Hub id or a local
    dataset script/folder) or ``train_data_dir`` (an image folder; with one sub-folder per class, e.g.
    ``train_data_dir/cat/001.png``, the sub-folder names become the labels).

    The image and label columns are renamed to ``image`` and ``label``. Images are **not decoded** when loaded:
    the ``image`` column holds ``{"bytes", "path"}`` records (`datasets.Image(decode=False)`) that `open_image`
    and the transforms decode, so a corrupt file fails with a `ValueError` naming it instead of an anonymous PIL
    error deep inside a data loader. Call `verify_images` to check every file before a long run.

    Args:
        dataset_name (`str`, *optional*): Hub dataset id or local dataset path for `datasets.load_dataset`.
        dataset_config_name (`str`, *optional*): the dataset's configuration, if it has several.
        train_data_dir (`str` or `os.PathLike`, *optional*): root of an image folder.
        image_column (`str`, defaults to ``"image"``): column holding the images.
        label_column (`str`, *optional*, defaults to ``"label"``): column holding integer class labels; `None`
            for unconditional data (no ``label`` column in the result).
        cache_dir (`str` or `os.PathLike`, *optional*): `datasets` cache directory.
        split (`str`, defaults to ``"train"``): the split to load.
        caption_column (`str`, *optional*): column of captions (a string or a list of strings per image), kept as
            ``caption``; an image folder gives them in a ``metadata.jsonl`` beside the images, one
            ``{"file_name": ..., "text": ...}`` line per image (diffusers' text-to-image convention: ``text``).

    Returns:
        `tuple`: ``(dataset, id2label)``; ``id2label`` comes from the label column's `datasets.ClassLabel` names
        (`None` when there is no label column or it is a plain integer column).

    Raises:
        ValueError: if neither or both sources are given, or a requested column is missing (the message lists
            the columns the dataset has).
    """
    import datasets

    if (dataset_name is None) == (train_data_dir is None):
        raise ValueError(
            "Give exactly one of `dataset_name` (a Hub dataset) or `train_data_dir` (a local image folder), got "
            f"dataset_name={dataset_name!r} and train_data_dir={train_data_dir!r}"
        )
    cache_dir = None if cache_dir is None else str(cache_dir)
    if dataset_name is not None:
        check_path_or_hub_id(dataset_name, "dataset_name")
        dataset = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split=split)
    else:
        if not Path(train_data_dir).exists():
            raise ValueError(no_such_path(train_data_dir, "train_data_dir"))
        if not Path(train_data_dir).is_dir():
            raise ValueError(f"train_data_dir {str(train_data_dir)!r} is a file; it must be a folder of images")
        if label_column == "label":
            _check_class_folders(train_data_dir)
        dataset = datasets.load_dataset("imagefolder", data_dir=str(train_data_dir), cache_dir=cache_dir, split=split)

    source = dataset_name if dataset_name is not None else str(train_data_dir)
    roles = (("image_column", image_column), ("label_column", label_column), ("caption_column", caption_column))
    for role, column in roles:
        if column is not None and column not in dataset.column_names:
            hint = (
                "; name the column of class labels (command line: --label_column NAME), or train unconditionally "
                "(label_column=None; command line: --num_classes 0)"
                if role == "label_column"
                else ""
            )
            raise ValueError(
                f"{role}={column!r} is not a column of {source!r}; available columns: {dataset.column_names}{hint}"
            )
    if not isinstance(dataset.features[image_column], datasets.Image):
        raise ValueError(
            f"image_column={image_column!r} of {source!r} is not an image column (its feature is "
            f"{dataset.features[image_column]}); available columns: {dataset.column_names}"
        )

    keep = [image_column] + [column for column in (label_column, caption_column) if column is not None]
    dataset = dataset.select_columns(keep)
    renames = {image_column: "image", label_column: "label", caption_column: "caption"}
    dataset = dataset.rename_columns({old: new for old, new in renames.items() if old in keep and old != new})
    dataset = dataset.cast_column("image", datasets.Image(decode=False))

    id2label = None
    if label_column is not None and isinstance(dataset.features["label"], datasets.ClassLabel):
        id2label = dict(enumerate(dataset.features["label"].names))
    return dataset, id2label


def _check_class_folders(root: str | os.PathLike) -> None:
    """Refuse an image folder whose layout gives no class labels, or wrong ones, before it is loaded.

    `datasets`' imagefolder takes each image's label from the folder that holds it, and only when every image is
    equally deep: a flat folder or a single class folder gets no labels, and ``root/cat/a/1.png`` gets the label
    ``"a"``. Labels need ``root/<class>/<image>`` with two classes or more. A folder with a metadata file
    (``metadata.jsonl``, ``.csv``, ``.parquet``) may carry its labels there and is not checked.

    Raises:
        ValueError: naming the folder, what its layout is, and what to do (sort the images, or train unconditionally).
    """
    root = Path(root)
    extensions = {extension.lower() for extension in PIL.Image.registered_extensions()}
    loose, nested, classes = [], [], set()
    for folder, folders, files in os.walk(root):
        if any(name in _IMAGEFOLDER_METADATA for name in files):
            return
        folders[:] = [name for name in folders if not name.startswith((".", "__"))]  # imagefolder skips these too
        depth = len(Path(folder).relative_to(root).parts)
        for name in files:
            if name.startswith(".") or Path(name).suffix.lower() not in extensions:
                continue
            if depth == 0:
                loose.append(name)
            elif depth == 1:
                classes.add(Path(folder).name)
            else:
                nested.append(str(Path(folder, name).relative_to(root)))
    unconditional = "or train unconditionally (label_column=None; command line: --num_classes 0)"
    layout = "labels come from one sub-folder per class, root/<class>/<image>"
    if nested:
        raise ValueError(
            f"train_data_dir {str(root)!r} has images nested below its class folders (e.g. {nested[0]!r}): {layout}, "
            "so these would be labelled by their inner folder. Move the images up into their class folders, point "
            f"train_data_dir at the folder whose sub-folders are the classes, {unconditional}"
        )
    if loose and classes:
        raise ValueError(
            f"train_data_dir {str(root)!r} has images directly in it ({len(loose)}, e.g. {loose[0]!r}) beside its "
            f"class folders {sorted(classes)[:5]}: {layout}. Move them into their class folders, {unconditional}"
        )
    if loose:
        raise ValueError(
            f"the images of train_data_dir {str(root)!r} lie directly in it, not in class folders: {layout}. Sort "
            f"them into one folder per class, {unconditional}"
        )
    if len(classes) == 1:
        raise ValueError(
            f"train_data_dir {str(root)!r} has one class folder ({classes.pop()!r}): {layout}, and class-conditional "
            f"training needs two or more. Add the other classes' folders, {unconditional}"
        )
    if not classes:
        raise ValueError(f"train_data_dir {str(root)!r} holds no image files")


def verify_images(dataset_or_data_dir, image_column: str = "image", max_reported: int = 20) -> int:
    """Fully decode every image once (`open_image`) and report all that fail, before training starts: unreadable
    files, and images whose PIL mode cannot be converted to 8 bits (32-bit integer or float).

    Args:
        dataset_or_data_dir: a `datasets.Dataset` (its ``image_column`` decoded or not) or the root of an image
            folder (loaded as `load_image_dataset(train_data_dir=...)` does).
        image_column (`str`, defaults to ``"image"``): the column to check.
        max_reported (`int`, defaults to 20): how many bad files the error message lists.

    Returns:
        `int`: the number of images checked.

    Raises:
        ValueError: listing the refused files and why.
    """
    import datasets

    if isinstance(dataset_or_data_dir, (str, os.PathLike)):
        dataset, _ = load_image_dataset(train_data_dir=dataset_or_data_dir, label_column=None)
    else:
        dataset = dataset_or_data_dir.select_columns([image_column])
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    failures = []
    for row in dataset:
        try:
            open_image(row[image_column])
        except ValueError as err:
            failures.append(str(err))
    if failures:
        listed = "\n  ".join(failures[:max_reported])
        more = f"\n  ... and {len(failures) - max_reported} more" if len(failures) > max_reported else ""
        raise ValueError(f"{len(failures)} of {len(dataset)} images are refused:\n  {listed}{more}")
    return len(dataset)
