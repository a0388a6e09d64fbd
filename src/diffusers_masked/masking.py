"""Token masks for masked diffusion training, and schedules of the mask ratio over training.

A mask is a boolean tensor of shape ``(batch, num_tokens)`` in the row-major order of the patch grid, with
``True`` marking a *removed* token. Every sample of a batch removes the same number of tokens, so the visible
tokens gather into a dense ``(batch, num_visible, dim)`` tensor.

Generators (all seeded by an optional ``torch.Generator``), by mask type:

* ``"patch"``, :func:`random_mask` - uniform random patches (MaskDiT; MaskDM "patch-wise"). Removes exactly
  ``floor(mask_ratio * num_tokens)`` tokens.
* ``"block"``, :func:`block_mask` - whole ``block_size x block_size`` blocks of patches (MaskDM "block-wise"). The
  removed count is a multiple of ``block_size**2``: ``round(mask_ratio * num_blocks)`` blocks, at least one kept.
* ``"crop"``, :func:`crop_mask` - one visible rectangle at a random position (MaskDM "cropping"). The rectangle is
  the one whose area is nearest to ``num_tokens - floor(mask_ratio * num_tokens)`` (the nearest-to-square among
  ties), so the count is exact whenever that area factors on the grid.

Schedules map a training step to a ratio: :class:`ConstantMaskSchedule`, :class:`CosinePowerMaskSchedule`
(MaskDiT's cosine-ratio ``0.5 * cos(pi/2 * i/n) ** 4``), :class:`LinearMaskSchedule` and
:class:`StagedMaskSchedule` (MaskDM's 90% -> 50%). Each round-trips through a plain dict (``to_dict`` /
:func:`mask_schedule_from_dict`) so a training config can carry it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch

MASK_TYPES = ("patch", "block", "crop")


def _check_ratio(mask_ratio: float, name: str = "mask_ratio") -> float:
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(mask_ratio).__name__}")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {mask_ratio}")
    return float(mask_ratio)


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be a positive int, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (an empty batch cannot be masked), got {batch_size}")
    return batch_size


def _check_grid(grid_size) -> tuple[int, int]:
    if isinstance(grid_size, int):
        grid_size = (grid_size, grid_size)
    if len(grid_size) != 2 or any(not isinstance(g, int) or g < 1 for g in grid_size):
        raise ValueError(f"grid_size must be a positive int or a pair (height, width) of them, got {grid_size}")
    return int(grid_size[0]), int(grid_size[1])


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, N, patch_size**2 * C)`` tokens in row-major grid order; the inverse of
    :func:`unpatchify`. Within a token the layout is ``(p, q, C)`` as in MAE and DiT."""
    batch, channels, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} must be divisible by patch_size={patch_size}")
    grid_h, grid_w = height // patch_size, width // patch_size
    x = images.reshape(batch, channels, grid_h, patch_size, grid_w, patch_size)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(batch, grid_h * grid_w, patch_size * patch_size * channels)


def unpatchify(tokens: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """``(B, N, patch_size**2 * C)`` -> ``(B, C, height, width)``; the inverse of :func:`patchify`."""
    batch, num_tokens, token_dim = tokens.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    if grid_h * grid_w != num_tokens or token_dim % (patch_size * patch_size):
        raise ValueError(
            f"cannot unpatchify {num_tokens} tokens of size {token_dim} into a {height}x{width} image "
            f"with patch_size={patch_size}"
        )
    channels = token_dim // (patch_size * patch_size)
    x = tokens.reshape(batch, grid_h, grid_w, patch_size, patch_size, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(batch, channels, height, width)


def num_masked_tokens(num_tokens: int, mask_ratio: float) -> int:
    """The count :func:`random_mask` removes per sample: ``floor(mask_ratio * num_tokens)``."""
    # The epsilon keeps e.g. 0.3 * 10 = 2.9999999999999996 from flooring to 2.
    return int(math.floor(mask_ratio * num_tokens + 1e-9))


def random_mask(
    batch_size: int,
    num_tokens: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform random patch mask, as in MAE and MaskDiT.

    Returns a bool tensor ``(batch_size, num_tokens)`` with exactly ``floor(mask_ratio * num_tokens)`` ``True``
    (removed) entries per row.
    """
    batch_size = _check_batch_size(batch_size)
    mask_ratio = _check_ratio(mask_ratio)
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    num_removed = num_masked_tokens(num_tokens, mask_ratio)
    gen_device = generator.device if generator is not None else "cpu"
    noise = torch.rand(batch_size, num_tokens, generator=generator, device=gen_device)  # [B, N]
    # The num_removed tokens with the largest noise are removed: a uniform random subset of that size.
    ranks = noise.argsort(dim=1).argsort(dim=1)  # [B, N], rank of each token's noise in its row
    mask = ranks >= num_tokens - num_removed
    return mask.to(device) if device is not None else mask


def block_mask(
    batch_size: int,
    grid_size: int | tuple[int, int],
    mask_ratio: float,
    block_size: int = 2,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Block-wise mask: removes whole ``block_size x block_size`` blocks of patches, aligned to the grid.

    ``round(mask_ratio * num_blocks)`` blocks are removed (at most ``num_blocks - 1``, so something stays
    visible); the removed token count is that times ``block_size**2``.
    """
    batch_size = _check_batch_size(batch_size)
    mask_ratio = _check_ratio(mask_ratio)
    grid_h, grid_w = _check_grid(grid_size)
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size}")
    if grid_h % block_size or grid_w % block_size:
        raise ValueError(
            f"block_size={block_size} must divide the patch grid {grid_h}x{grid_w}; "
            "choose a block_size among "
            f"{[b for b in range(1, min(grid_h, grid_w) + 1) if grid_h % b == 0 and grid_w % b == 0]}"
        )
    blocks_h, blocks_w = grid_h // block_size, grid_w // block_size
    num_blocks = blocks_h * blocks_w
    num_removed_blocks = _num_removed_blocks(num_blocks, mask_ratio)
    gen_device = generator.device if generator is not None else "cpu"
    noise = torch.rand(batch_size, num_blocks, generator=generator, device=gen_device)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    blocks = (ranks >= num_blocks - num_removed_blocks).view(batch_size, blocks_h, 1, blocks_w, 1)
    # Expand every block to its block_size x block_size patches on the grid.
    mask = blocks.expand(batch_size, blocks_h, block_size, blocks_w, block_size).reshape(batch_size, grid_h * grid_w)
    return mask.to(device) if device is not None else mask


def _num_removed_blocks(num_blocks: int, mask_ratio: float) -> int:
    return min(int(round(mask_ratio * num_blocks)), num_blocks - 1)


def _crop_shape(grid_h: int, grid_w: int, num_visible: int) -> tuple[int, int]:
    best = None
    for h in range(1, grid_h + 1):
        for w in range(1, grid_w + 1):
            # nearest area first, then the most square, then the taller one for determinism
            key = (abs(h * w - num_visible), abs(h / grid_h - w / grid_w), -h)
            if best is None or key < best[0]:
                best = (key, (h, w))
    return best[1]


def crop_mask(
    batch_size: int,
    grid_size: int | tuple[int, int],
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Cropping mask: one visible rectangle of patches per sample, at a uniformly random position.

    All samples share the rectangle's shape (so the visible count is equal), chosen with area nearest to
    ``num_tokens - floor(mask_ratio * num_tokens)``; everything outside it is removed.
    """
    batch_size = _check_batch_size(batch_size)
    mask_ratio = _check_ratio(mask_ratio)
    grid_h, grid_w = _check_grid(grid_size)
    num_tokens = grid_h * grid_w
    crop_h, crop_w = _crop_shape(grid_h, grid_w, num_tokens - num_masked_tokens(num_tokens, mask_ratio))
    gen_device = generator.device if generator is not None else "cpu"
    top = torch.randint(0, grid_h - crop_h + 1, (batch_size,), generator=generator, device=gen_device)
    left = torch.randint(0, grid_w - crop_w + 1, (batch_size,), generator=generator, device=gen_device)
    rows = torch.arange(grid_h, device=gen_device).view(1, grid_h, 1)
    cols = torch.arange(grid_w, device=gen_device).view(1, 1, grid_w)
    inside = (
        (rows >= top.view(-1, 1, 1))
        & (rows < (top + crop_h).view(-1, 1, 1))
        & (cols >= left.view(-1, 1, 1))
        & (cols < (left + crop_w).view(-1, 1, 1))
    )
    mask = ~inside.reshape(batch_size, num_tokens)
    return mask.to(device) if device is not None else mask


def generate_mask(
    mask_type: str,
    batch_size: int,
    grid_size: int | tuple[int, int],
    mask_ratio: float,
    block_size: int = 2,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Dispatch on ``mask_type``: ``"patch"`` (`random_mask`), ``"block"`` (`block_mask`) or ``"crop"``
    (`crop_mask`)."""
    grid_h, grid_w = _check_grid(grid_size)
    if mask_type == "patch":
        return random_mask(batch_size, grid_h * grid_w, mask_ratio, generator=generator, device=device)
    if mask_type == "block":
        return block_mask(batch_size, (grid_h, grid_w), mask_ratio, block_size, generator=generator, device=device)
    if mask_type == "crop":
        return crop_mask(batch_size, (grid_h, grid_w), mask_ratio, generator=generator, device=device)
    raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")


def generated_mask_count(
    mask_type: str, grid_size: int | tuple[int, int], mask_ratio: float, block_size: int = 2
) -> int:
    """The number of tokens `generate_mask` removes per sample with these arguments, without drawing a mask.

    Passed on as ``num_masked`` (to a model's `forward` or `masked_training_loss`), it spares them reading the mask's
    values, which on an accelerator would make the host wait for the device at every step."""
    grid_h, grid_w = _check_grid(grid_size)
    mask_ratio = _check_ratio(mask_ratio)
    num_tokens = grid_h * grid_w
    if mask_type == "patch":
        return num_masked_tokens(num_tokens, mask_ratio)
    if mask_type == "block":
        num_blocks = (grid_h // block_size) * (grid_w // block_size)
        return _num_removed_blocks(num_blocks, mask_ratio) * block_size * block_size
    if mask_type == "crop":
        crop_h, crop_w = _crop_shape(grid_h, grid_w, num_tokens - num_masked_tokens(num_tokens, mask_ratio))
        return num_tokens - crop_h * crop_w
    raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")


def check_mask(mask: torch.Tensor, batch_size: int, num_tokens: int, num_masked: int | None = None) -> int:
    """Validate a user mask and return its (common) number of removed tokens per sample.

    With ``num_masked`` (the count its generator removes, e.g. from `generated_mask_count`) only the mask's shape and
    dtype are checked and ``num_masked`` is returned: nothing reads the mask's values, so no device synchronises.
    Without it, the counts are read (one device-to-host copy) and must be equal."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.bool tensor of shape ({batch_size}, {num_tokens}), got {type(mask)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool (True = removed token), got {mask.dtype}")
    if tuple(mask.shape) != (batch_size, num_tokens):
        raise ValueError(
            f"mask must have shape (batch, num_tokens) = ({batch_size}, {num_tokens}), got {tuple(mask.shape)}"
        )
    if num_masked is not None:
        if isinstance(num_masked, bool) or not isinstance(num_masked, int) or not 0 <= num_masked < num_tokens:
            raise ValueError(
                f"num_masked must be an int in [0, {num_tokens}) (at least one token visible), got {num_masked!r}"
            )
        return num_masked
    counts = mask.sum(dim=1).tolist()
    if any(count != counts[0] for count in counts):
        raise ValueError(f"mask must remove the same number of tokens in every sample, got counts {counts}")
    num_removed = counts[0]
    if num_removed >= num_tokens:
        raise ValueError(f"mask removes all {num_tokens} tokens; at least one must stay visible")
    return num_removed


def visible_token_ids(mask: torch.Tensor, num_visible: int) -> torch.Tensor:
    """The indices ``(batch, num_visible)`` of each sample's visible tokens, in grid order, for gathering them out
    of a ``(batch, num_tokens, dim)`` sequence (and scattering results back)."""
    # A stable sort puts the visible (False) tokens first, in grid order.
    return torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :num_visible]


# ----------------------------------------------------------------------------------------------------------------
# Mask-ratio schedules
# ----------------------------------------------------------------------------------------------------------------


def _check_steps(num_steps: int) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps}")
    return num_steps


def _progress(step: int, num_steps: int) -> float:
    """How far `step` is through `num_steps`, in [0, 1] (0 before the start, 1 from the end on)."""
    return min(max(step, 0) / num_steps, 1.0)


@dataclass(frozen=True)
class ConstantMaskSchedule:
    """The same ratio at every step."""

    ratio: float = 0.5
    type: str = field(default="constant", init=False)

    def __post_init__(self):
        _check_ratio(self.ratio, "ratio")

    def __call__(self, step: int) -> float:
        return float(self.ratio)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CosinePowerMaskSchedule:
    """``initial_ratio * cos(pi/2 * min(step / num_steps, 1)) ** power``.

    With ``initial_ratio=0.5, power=4`` this is MaskDiT's cosine-ratio unmasking schedule: 0.5 at step 0,
    0 from ``num_steps`` on.
    """

    num_steps: int
    initial_ratio: float = 0.5
    power: float = 4.0
    type: str = field(default="cosine_power", init=False)

    def __post_init__(self):
        _check_steps(self.num_steps)
        _check_ratio(self.initial_ratio, "initial_ratio")
        if self.power <= 0:
            raise ValueError(f"power must be > 0, got {self.power}")

    def __call__(self, step: int) -> float:
        progress = _progress(step, self.num_steps)
        return float(self.initial_ratio * math.cos(math.pi / 2 * progress) ** self.power)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LinearMaskSchedule:
    """Linear from ``start_ratio`` at step 0 to ``end_ratio`` at ``num_steps``, constant after."""

    num_steps: int
    start_ratio: float = 0.5
    end_ratio: float = 0.0
    type: str = field(default="linear", init=False)

    def __post_init__(self):
        _check_steps(self.num_steps)
        _check_ratio(self.start_ratio, "start_ratio")
        _check_ratio(self.end_ratio, "end_ratio")

    def __call__(self, step: int) -> float:
        progress = _progress(step, self.num_steps)
        return float(self.start_ratio + (self.end_ratio - self.start_ratio) * progress)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StagedMaskSchedule:
    """Piecewise-constant: ``stages = [(until_step, ratio), ...]`` uses ``ratio`` while ``step < until_step``.

    The last stage's ratio holds after its ``until_step``. MaskDM's 90% -> 50% pre-training is
    ``StagedMaskSchedule([(n1, 0.9), (n2, 0.5)])``.
    """

    stages: tuple
    type: str = field(default="staged", init=False)

    def __post_init__(self):
        try:
            stages = tuple((int(until), float(ratio)) for until, ratio in self.stages)
        except (TypeError, ValueError) as err:
            raise ValueError(f"stages must be a list of (until_step, ratio) pairs, got {self.stages!r}") from err
        if not stages:
            raise ValueError("stages must hold at least one (until_step, ratio) pair")
        previous = 0
        for until, ratio in stages:
            _check_ratio(ratio, "stages ratio")
            if until <= previous:
                raise ValueError(f"stages until_step values must be positive and increasing, got {self.stages!r}")
            previous = until
        object.__setattr__(self, "stages", stages)

    def __call__(self, step: int) -> float:
        for until, ratio in self.stages:
            if step < until:
                return ratio
        return self.stages[-1][1]

    def to_dict(self) -> dict:
        return {"type": self.type, "stages": [list(stage) for stage in self.stages]}


MASK_SCHEDULES = {
    "constant": ConstantMaskSchedule,
    "cosine_power": CosinePowerMaskSchedule,
    "linear": LinearMaskSchedule,
    "staged": StagedMaskSchedule,
}

MaskSchedule = ConstantMaskSchedule | CosinePowerMaskSchedule | LinearMaskSchedule | StagedMaskSchedule


def mask_schedule_from_dict(config: dict) -> MaskSchedule:
    """Build a schedule from ``{"type": name, **arguments}`` as written by ``to_dict``."""
    if not isinstance(config, dict) or "type" not in config:
        raise ValueError(f"a mask schedule config must be a dict with a 'type' key, got {config!r}")
    kwargs = dict(config)
    kind = kwargs.pop("type")
    if kind not in MASK_SCHEDULES:
        raise ValueError(f"mask schedule type must be one of {sorted(MASK_SCHEDULES)}, got {kind!r}")
    cls = MASK_SCHEDULES[kind]
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for the {kind!r} mask schedule: {kwargs!r} ({err})") from err


def parse_staged_ratios(spec: str) -> StagedMaskSchedule:
    """Read MaskDM's staged ratios written as ``"ratio@start-end,..."``, e.g. ``"0.9@0-200000,0.5@200000-"``: the
    ranges must start at 0 and follow each other; only the last may be open (its ratio then holds for good)."""
    stages, expected_start = [], 0
    parts = [part.strip() for part in spec.split(",")]
    for i, part in enumerate(parts):
        try:
            ratio, steps = part.split("@")
            start, end = steps.split("-")
            ratio, start = float(ratio), int(start)
            end = int(end) if end.strip() else None
        except ValueError:
            raise ValueError(
                f"mask schedule stages must read 'ratio@start-end', e.g. '0.9@0-200000,0.5@200000-'; got {part!r}"
            ) from None
        if start != expected_start:
            raise ValueError(
                f"mask schedule stage {part!r} starts at {start}, expected {expected_start} (stages must follow each "
                "other from 0)"
            )
        if end is None and i != len(parts) - 1:
            raise ValueError(f"only the last mask schedule stage may be open-ended, got {part!r}")
        # An open last stage holds its ratio from `start` on: StagedMaskSchedule keeps the last ratio after its end.
        end = start + 1 if end is None else end
        stages.append((end, ratio))
        expected_start = end
    return StagedMaskSchedule(stages)


def parse_mask_schedule(spec: str | dict | float | None, default_ratio: float = 0.5) -> MaskSchedule:
    """Read a schedule from a command-line value: ``None`` (constant ``default_ratio``), a number (constant), a
    JSON object such as ``'{"type": "staged", "stages": [[5000, 0.9], [10000, 0.5]]}'``, staged ratios such as
    ``"0.9@0-200000,0.5@200000-"`` (`parse_staged_ratios`), or a dict."""
    if spec is None:
        return ConstantMaskSchedule(default_ratio)
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return ConstantMaskSchedule(float(spec))
    if isinstance(spec, str) and "@" in spec:
        return parse_staged_ratios(spec)
    if isinstance(spec, str):
        try:
            value = json.loads(spec)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"mask_schedule must be a number or a JSON object with a 'type' among {sorted(MASK_SCHEDULES)}, "
                f"got {spec!r}"
            ) from err
        return parse_mask_schedule(value, default_ratio)
    return mask_schedule_from_dict(spec)
