"""The one place this package renames files into place: writes that a crash, a kill or a concurrent reader must
never see half done.

A file is written under a temporary name beside its target and renamed over it (`atomic_write`); a folder is built
under a temporary name and renamed into place once complete (`commit_dir`). With ``durable=True`` the data and the
rename are fsynced, so they survive a power loss too (checkpoints, published pipelines); caches skip that cost.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_write_text", "commit_dir", "fsync_dir", "fsync_tree", "move", "staging_dir"]


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder, so that the renames and deletions inside it are durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file under `folder`, then every folder bottom-up, so a rename after it publishes durable data."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(root)


def atomic_write(
    path: str | os.PathLike, write: Callable[[str], Any], suffix: str = "", durable: bool = False
) -> Path:
    """Create or replace the file `path` so that readers see the old file or the complete new one, never a part.

    ``write(tmp)`` writes the content to ``tmp``, a temporary file name in the same folder (ending in `suffix`, for
    writers that insist on an extension, e.g. ``np.savez``); it is then renamed over `path`. On any failure the
    temporary file is removed and `path` is left as it was.

    Args:
        path (`str` or `os.PathLike`): the target; its folder is created if needed.
        write (`Callable[[str], Any]`): writes the content to the path it is given.
        suffix (`str`, defaults to ``""``): the temporary name's ending.
        durable (`bool`, defaults to `False`): fsync the file before and its folder after the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, durable: bool = False) -> Path:
    """`atomic_write` of a text file (UTF-8)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), durable=durable)


def staging_dir(final: str | os.PathLike) -> Path:
    """The empty folder ``.partial-<name>`` beside `final`, to build it in before `commit_dir`; what an interrupted
    earlier build left there is removed first (the name is this package's own)."""
    final = Path(final)
    staging = final.parent / f".partial-{final.name}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def save_dataset(dataset, final: str | os.PathLike, scratch_dir: str | os.PathLike | None = None) -> None:
    """Save a `datasets.Dataset` as the folder `final` in one step: written under a temporary name in `scratch_dir`
    (default: `final`'s parent; same file system), then moved into place by `commit_dir` without fsync (a cache can be
    rebuilt), so a crash leaves no half-written `final`, and a `final` that a concurrent process finished first is
    kept. The caller drops its own references to `dataset` before deleting files the dataset maps."""
    final = Path(final)
    work_dir = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=scratch_dir or final.parent))
    try:
        dataset.save_to_disk(str(work_dir / "dataset"))
        commit_dir(work_dir / "dataset", final, durable=False)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def commit_dir(
    staging: str | os.PathLike, final: str | os.PathLike, replace: bool = False, durable: bool = True
) -> bool:
    """Rename the complete folder `staging` to `final` in one step.

    Args:
        staging (`str` or `os.PathLike`): the built folder, in the same file system as `final` (`staging_dir`).
        final (`str` or `os.PathLike`): the target.
        replace (`bool`, defaults to `False`): remove an existing `final` first (it is then absent for a moment:
            callers that replace, e.g. a checkpoint of the same step, keep an earlier complete one beside it).
            Without it an existing `final` is kept and `staging` removed, which makes two processes that build the
            same cache concurrently both succeed.
        durable (`bool`, defaults to `True`): fsync the folder's files before and the parent after the rename.

    Returns:
        `bool`: whether `staging` became `final` (`False`: `final` existed and was kept).
    """
    staging, final = Path(staging), Path(final)
    if durable:
        fsync_tree(staging)
    if replace and final.exists():
        shutil.rmtree(final)
    try:
        os.rename(staging, final)
    except OSError:
        if replace or not final.is_dir():
            raise
        shutil.rmtree(staging, ignore_errors=True)
        return False
    if durable:
        fsync_dir(final.parent)
    return True


def move(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename `source` over `target` (a file, or a folder where `target` does not exist) in one step."""
    os.replace(source, target)
