"""What a run owns in its output folder, so that it never deletes or overwrites a file it did not write.

Every file a run writes into its output folder (its config, validation grids, evaluation, samples, the published
pipeline and online weights) is recorded, with its size and modification time, in the folder's manifest
``.diffusers-masked.json`` under the run's lineage (its run id, kept across resumes); folders it fills through other
libraries (TensorBoard's ``logs/``, a latent cache) are recorded as owned folders; checkpoints carry their lineage
themselves. Before any work, `check_output_folder` refuses a folder holding anything else:

* a new run needs a new or empty folder;
* a resumed run may find only what its own lineage recorded, unchanged;
* ``--overwrite_output_dir`` lets a run write beside foreign files: same-named files are replaced, nothing else is
  touched.

Publishing moves files in one by one (`publish_files`) and removes only files the same lineage published before.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from ..utils.io import atomic_write_text, fsync_dir, move

MANIFEST = ".diffusers-masked.json"
LOCK_FILE = ".diffusers-masked.lock"
_CHECKPOINT = re.compile(r"^checkpoint-\d+$")
_PARTIAL = ".partial-"
MAX_LISTED = 10


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def read_manifest(output_dir: str | os.PathLike) -> dict:
    """The folder's manifest: ``run_id``, ``files`` (relative path -> [size, mtime_ns]), ``dirs`` (owned folders)
    and ``published`` (the files of the last publish); an empty one where there is none or it cannot be read (then
    nothing in the folder counts as a run's)."""
    path = Path(output_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {"run_id": None, "files": {}, "dirs": [], "published": []}
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return {"run_id": None, "files": {}, "dirs": [], "published": []}
    manifest.setdefault("dirs", [])
    manifest.setdefault("published", [])
    return manifest


def record_outputs(
    output_dir: str | os.PathLike,
    run_id: str,
    names: Iterable[str] = (),
    dirs: Iterable[str | os.PathLike] = (),
    published: Iterable[str] | None = None,
) -> None:
    """Record files (and owned folders) this run wrote into `output_dir`, atomically. Main process only.

    Args:
        names: the files written, relative to `output_dir` (``"validation/step-0000500.png"``); their current size
            and modification time are what a resume will expect to find.
        dirs: folders, relative to `output_dir`, whose whole content the run owns (TensorBoard logs, a latent cache).
        published (*optional*): the files of a publish, replacing the previous publish's list.
    """
    root = Path(output_dir)
    manifest = read_manifest(root)
    if manifest["run_id"] != run_id:
        manifest = {"run_id": run_id, "files": {}, "dirs": [], "published": []}
    for name in names:
        manifest["files"][Path(name).as_posix()] = _stamp(root / name)
    manifest["dirs"] = sorted(set(manifest["dirs"]) | {Path(d).as_posix() for d in dirs})
    if published is not None:
        manifest["published"] = sorted(Path(name).as_posix() for name in published)
    manifest["version"] = 1
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))


def _unsaved_attempt(manifest: dict, root: Path) -> bool:
    """The folder's recorded run stopped before it saved anything: no checkpoint, no published pipeline. A new run
    may take its place: what it wrote (config, logs, grids) was written by this package and saved nothing."""
    return (
        manifest["run_id"] is not None
        and not manifest["published"]
        and not any(_CHECKPOINT.match(p.name) for p in root.iterdir() if p.is_dir())
    )


def claim_output_folder(output_dir: str | os.PathLike, run_id: str) -> None:
    """Make the folder's manifest the run `run_id`'s (main process, after `check_output_folder`): a resumed lineage
    keeps its record, a new run takes over that of an unsaved earlier attempt (`_unsaved_attempt`) so its files stay
    the package's, and otherwise starts an empty one."""
    root = Path(output_dir)
    manifest = read_manifest(root)
    if manifest["run_id"] == run_id:
        return
    if _unsaved_attempt(manifest, root):
        manifest["run_id"] = run_id
    else:
        manifest = {"run_id": run_id, "files": {}, "dirs": [], "published": []}
    manifest["version"] = 1
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))


def _reserved(name: str) -> bool:
    top = name.split("/", 1)[0]
    return top in (LOCK_FILE, MANIFEST) or top.startswith(_PARTIAL) or bool(_CHECKPOINT.match(top))


def foreign_files(output_dir: str | os.PathLike, run_id: str | None) -> list[str]:
    """The files in `output_dir` that the lineage `run_id` did not write (all of them for a new run, `None`), or
    changed since; checkpoints (their lineage is checked apart), the lock, the manifest and unfinished ``.partial-``
    folders aside."""
    root = Path(output_dir)
    manifest = read_manifest(root)
    own = manifest["run_id"] is not None and manifest["run_id"] == run_id
    owned_dirs = [d.rstrip("/") + "/" for d in manifest["dirs"]] if own else []
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        name = _relative(path, root)
        if _reserved(name) or any(name.startswith(d) for d in owned_dirs):
            continue
        recorded = manifest["files"].get(name) if own else None
        if recorded is None or path.is_symlink() or recorded != _stamp(path):
            found.append(name)
    return found


def check_output_folder(output_dir: str | os.PathLike, run_id: str | None, overwrite: bool = False) -> str | None:
    """Why this run may not write into `output_dir` (`None` if it may).

    Args:
        run_id (`str`, *optional*): the lineage of the checkpoint being resumed; `None` for a new run.
        overwrite (`bool`, defaults to `False`): ``--overwrite_output_dir``: write beside foreign files.
    """
    root = Path(output_dir)
    if root.exists() and not root.is_dir():
        return f"--output_dir {root} is a file, not a folder: choose a folder for the run's outputs"
    if not root.exists() or overwrite:
        return None
    if run_id is None:
        manifest = read_manifest(root)
        run_id = manifest["run_id"] if _unsaved_attempt(manifest, root) else None
        new = True
    else:
        new = False
    foreign = foreign_files(root, run_id)
    if not foreign:
        return None
    listed = ", ".join(foreign[:MAX_LISTED]) + (
        f" and {len(foreign) - MAX_LISTED} more" if len(foreign) > MAX_LISTED else ""
    )
    what = "a new run needs a new or empty folder" if new else "a resumed run may find only what it wrote"
    return (
        f"{root} holds files this run did not write ({listed}); {what}, and a run never overwrites or deletes files "
        "it did not write. Choose another --output_dir, move those files away, or pass --overwrite_output_dir to "
        "write the run's outputs beside them (same-named files are replaced; nothing else is touched)"
    )


def publish_files(
    staging: str | os.PathLike, output_dir: str | os.PathLike, previous: Iterable[str] = ()
) -> list[str]:
    """Move every file of the complete folder `staging` to the same place under `output_dir`, one rename each
    (replacing a same-named file), then remove the files of `previous` (what this lineage published before) that the
    new set does not have. Nothing else in `output_dir` is touched. Returns the moved files, relative, sorted.

    ``model_index.json`` (what makes a folder a pipeline), if present, is removed first and moved in last, so that at
    every moment the folder is either no pipeline or the complete new one."""
    staging, root = Path(staging), Path(output_dir)
    files = sorted(_relative(p, staging) for p in staging.rglob("*") if p.is_file())
    # Every target is checked before anything moves: a folder where a file goes, or a file where a folder goes, is
    # refused with nothing touched.
    for name in files:
        target = root / name
        blocked = [target] if target.is_dir() and not target.is_symlink() else []
        blocked += [
            parent for parent in target.parents if root in parent.parents and parent.exists() and not parent.is_dir()
        ]
        if blocked:
            raise ValueError(
                f"{blocked[0]} is in the way of this run's {name}; move it away and run again (nothing was written)"
            )
    index = "model_index.json"
    if index in files and (root / index).exists():
        (root / index).unlink()
        fsync_dir(root)
    for name in [f for f in files if f != index] + ([index] if index in files else []):
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        move(staging / name, target)
        fsync_dir(target.parent)
    for name in sorted(set(previous) - set(files)):
        stale = root / name
        if stale.is_file() and not _reserved(name):
            stale.unlink()
    return files
