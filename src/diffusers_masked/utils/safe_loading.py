"""The one way this package reads a file it did not just write: nothing in the file can run code.

- safetensors and JSON carry no code; they are checked for damage (`check_safetensors`, `read_json`).
- torch archives are read with ``weights_only=True`` (`check_torch_archive`); a foreign checkpoint that also pickles
  objects of its own (an official training checkpoint's ``args``) is read by `load_torch_file`, whose unpickler
  rebuilds tensors and turns every other object into an inert stub.
- torch.distributed.checkpoint stores its index (``.metadata``) as a plain pickle that torch reads with
  `pickle.load`: `check_dcp_metadata` reads it first with an unpickler that resolves only checkpoint metadata.

Every function raises `ValueError` naming the file (plus the caller's ``hint``, e.g. what to do instead).

Arguments that take a local path or a Hub id go through `check_path_or_hub_id` first, so a mistyped local path says
"no such file or folder" instead of reaching the Hub as a repo id; `check_model_folder` refuses a local diffusers
folder that holds another model class before anything is loaded.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "check_dcp_metadata",
    "check_model_folder",
    "check_path_or_hub_id",
    "check_safetensors",
    "check_torch_archive",
    "load_safetensors",
    "load_torch_file",
    "no_such_path",
    "read_json",
    "shape_mismatch",
]


def _with_hint(message: str, hint: str) -> str:
    return f"{message}; {hint}" if hint else message


def shape_mismatch(expected: dict, found: dict) -> str:
    """How `found` (name -> shape) differs from `expected`: the missing, unexpected and differently shaped names (up
    to five of each); an empty string if they agree."""
    parts = []
    if missing := sorted(set(expected) - set(found)):
        parts.append(f"missing {missing[:5]}")
    if unexpected := sorted(set(found) - set(expected)):
        parts.append(f"unexpected {unexpected[:5]}")
    if changed := [key for key in expected if key in found and expected[key] != found[key]]:
        parts.append(
            "different " + ", ".join(f"{key}: {found[key]} instead of {expected[key]}" for key in changed[:5])
        )
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------
# Local paths and Hub ids
# ---------------------------------------------------------------------------------------------------------

# A Hub repo id: ``name`` or ``org/name`` of letters, digits, ``-``, ``_`` and ``.`` (huggingface_hub's rule).
_HUB_ID = re.compile(r"[\w\-][\w\-.]*(/[\w\-][\w\-.]*)?")
# Names ending like this are files, never repo ids (``--vae autoencoder_kl.pth``).
_FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".npz", ".json")


def no_such_path(path: str | os.PathLike, name: str) -> str:
    """The message for a local path that does not exist: ``"<name>: no such file or folder: <path>"``."""
    return f"{name}: no such file or folder: {os.fspath(path)}"


def check_path_or_hub_id(value: str | os.PathLike | None, name: str) -> None:
    """Refuse a value that can only be a local path (absolute, ``./``, ``../``, ``~``, a backslash, more than one
    ``/``, a checkpoint file name, or an `os.PathLike`) when nothing exists there; ``name`` and ``org/name`` that are
    not local paths are Hub ids and left to the loader.

    Args:
        value: the path or Hub id (`None` passes).
        name (`str`): the argument or flag it came from, for the message (e.g. ``"--vae"``).

    Raises:
        ValueError: ``"<name>: no such file or folder: <value>"``.
    """
    if value is None or os.path.exists(value):
        return
    text = os.fspath(value)
    hub_id = (
        isinstance(value, str)
        and _HUB_ID.fullmatch(text) is not None
        and ".." not in text
        and not text.lower().endswith(_FILE_SUFFIXES)
    )
    if not hub_id:
        raise ValueError(no_such_path(text, name))


def check_model_folder(
    path: str | os.PathLike,
    class_name: str,
    subfolder: str | None = None,
    name: str = "model",
    subfolder_name: str = "subfolder",
) -> None:
    """Refuse, before anything is loaded, a local diffusers folder that does not hold a ``class_name`` model: its
    ``config.json`` must name that class (``_class_name``). A pipeline folder given without its subfolder is told which
    one holds the model. A Hub id is left to the loader; a missing local path is refused by `check_path_or_hub_id`.

    Args:
        path: the folder or Hub id.
        class_name (`str`): e.g. ``"AutoencoderKL"``.
        subfolder (`str`, *optional*): the model's folder inside ``path`` (e.g. ``"vae"``).
        name (`str`), subfolder_name (`str`): the arguments or flags they came from, for the message.

    Raises:
        ValueError: naming the folder, what it holds instead and what to pass.
    """
    check_path_or_hub_id(path, name)
    root = Path(path)
    if not root.exists():
        return  # a Hub id
    if not root.is_dir():
        raise ValueError(f"{name} {str(path)!r} is a file; it must be a diffusers {class_name} folder")
    folder = root / subfolder if subfolder else root
    config_file = folder / "config.json"
    if config_file.is_file():
        config = read_json(config_file)
        found = config.get("_class_name") if isinstance(config, dict) else None
        if found == class_name:
            return
        raise ValueError(
            f"{name} {str(path)!r} must be a diffusers {class_name} folder, but {config_file} describes "
            + (f"a {found}" if found else "no diffusers model (it names no _class_name)")
        )
    hint = ""
    if not subfolder and (root / "model_index.json").is_file():
        index = read_json(root / "model_index.json")
        components = [key for key, value in index.items() if isinstance(value, list) and value[-1:] == [class_name]]
        if components:
            hint = f"; it is a pipeline folder whose {components[0]!r} holds the {class_name}: pass {subfolder_name} "
            hint += components[0]
    raise ValueError(f"{name} {str(path)!r} is not a diffusers {class_name} folder: {folder} has no config.json{hint}")


def read_json(path: str | os.PathLike, hint: str = "") -> Any:
    """The parsed content of a JSON file.

    Raises:
        ValueError: naming the file, if it is missing, unreadable or not JSON.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(_with_hint(f"{path} is missing", hint)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        # The message names the file and the parser's error: one line, without the parser's traceback.
        raise ValueError(_with_hint(f"{path} is damaged ({err})", hint)) from None


def check_safetensors(path: str | os.PathLike, hint: str = "") -> None:
    """Refuse a safetensors file whose header cannot be read (truncated, not safetensors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as err:
        raise ValueError(_with_hint(f"{path} is damaged ({err})", hint)) from err


def load_safetensors(path: str | os.PathLike, hint: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file and its metadata (an empty dict if it has none)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        return load_file(str(path)), metadata
    except Exception as err:
        raise ValueError(_with_hint(f"{path} is not a readable safetensors file ({err})", hint)) from err


def check_torch_archive(path: str | os.PathLike, hint: str = "") -> None:
    """Refuse a torch archive that ``weights_only=True`` cannot read (as accelerate reads it, with its allowlist for
    numpy's random state), memory-mapped: the pickle is parsed, the tensor data not read. A truncated archive has no
    zip directory (it sits at the end), so it is refused here too."""
    from accelerate.utils import load

    try:
        load(path, map_location="cpu", mmap=True)
    except Exception as err:
        raise ValueError(_with_hint(f"refusing to load {path} ({type(err).__name__}: {err})", hint)) from err


# ---------------------------------------------------------------------------------------------------------
# torch.distributed.checkpoint's index
# ---------------------------------------------------------------------------------------------------------

# The only globals a torch.distributed.checkpoint index refers to.
_DCP_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
} | {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _DCP_METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a checkpoint index never holds")


def check_dcp_metadata(path: str | os.PathLike, hint: str = "") -> None:
    """Refuse a torch.distributed.checkpoint index (``.metadata``) that would run code when torch unpickles it.

    Raises:
        ValueError: naming the file, if it is missing, damaged, or refers to anything but checkpoint metadata.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            _MetadataUnpickler(handle).load()
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: {path.parent} is not a complete sharded checkpoint") from None
    except Exception as err:  # a damaged pickle can fail in many ways; none of them may reach torch's pickle.load
        raise ValueError(_with_hint(f"refusing to load {path}: {err}", hint)) from err


# ---------------------------------------------------------------------------------------------------------
# Foreign checkpoints (official releases)
# ---------------------------------------------------------------------------------------------------------


class _Stub:
    """Stands in for any class or function a pickle names that is not a tensor-rebuild function: calling it,
    building it or filling it only records the arguments, so nothing the file names is imported or run."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, []

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items.append((key, value))

    def append(self, value):
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)

    def __repr__(self):
        return f"<stub {type(self).__module__}.{type(self).__qualname__}>"


_TENSOR_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch.nn.parameter", "Parameter"),
    ("torch", "Tensor"),
    ("torch", "Size"),
}


def _allowed_global(module: str, name: str):
    """What a checkpoint may name and get the real object for: torch's tensor-rebuild functions, dtypes and the
    containers a state dict is made of. ``None`` for everything else."""
    if (module, name) == ("collections", "OrderedDict"):
        return OrderedDict
    if (module, name) in _TENSOR_GLOBALS:
        return getattr(__import__(module, fromlist=[name]), name, None)
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    return None


def _restricted_pickle_module(stubbed: set[str]) -> types.ModuleType:
    """A ``pickle``-like module for ``torch.load(pickle_module=...)`` whose unpickler resolves only
    `_allowed_global`s and turns every other global into an inert `_Stub` subclass (recorded in `stubbed`)."""

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            found = _allowed_global(module, name)
            if found is not None:
                return found
            stubbed.add(f"{module}.{name}")
            return type(name, (_Stub,), {"__module__": module, "__qualname__": name})

    module = types.ModuleType("diffusers_masked_restricted_pickle")
    module.Unpickler = RestrictedUnpickler
    module.load = lambda file, **kwargs: RestrictedUnpickler(file, **kwargs).load()
    return module


def _unreadable_checkpoint(path: Path, err: Exception) -> str:
    # torch's own message for a truncated archive runs to several sentences; its first one says what failed.
    first = str(err).split(". ")[0].strip()
    return (
        f"{path} is not a readable torch checkpoint: truncated, damaged or another format ({type(err).__name__}: "
        f"{first})"
    )


def load_torch_file(path: str | os.PathLike):
    """Read a checkpoint file without executing anything it contains.

    ``.safetensors`` files are read with safetensors. Other files go to ``torch.load(weights_only=True)``; a file
    that loader refuses because it also pickles other objects (a training checkpoint's ``args``, a config object) is
    read again with an unpickler that rebuilds tensors and turns every other object into an inert stub, so a
    malicious ``__reduce__`` cannot run.

    Args:
        path (`str` or `os.PathLike`): The file.

    Returns:
        What the file holds: a state dict, or a dict of them (``{"model", "ema", "opt", "args"}``).

    Raises:
        ValueError: naming the file, if it is not a file or cannot be read as a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            no_such_path(path, "checkpoint") if not path.exists() else f"checkpoint {str(path)!r} is not a file"
        )
    if path.suffix == ".safetensors":
        return load_safetensors(path)[0]
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_error = error
    except Exception as err:
        raise ValueError(_unreadable_checkpoint(path, err)) from err
    stubbed: set[str] = set()
    try:
        checkpoint = torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module(stubbed)
        )
    except Exception as err:
        raise ValueError(_unreadable_checkpoint(path, err)) from err
    logger.info(
        f"{path.name} holds more than tensors ({first_error.__class__.__name__} from weights_only=True); read it with "
        f"tensor rebuilding only, these globals were replaced by inert stubs: {sorted(stubbed)}"
    )
    return checkpoint
