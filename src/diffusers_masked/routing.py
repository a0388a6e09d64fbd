"""Token routing (TREAD, Krause et al. 2025): in training, a random subset of the tokens skips a span of blocks.

A *route* ``(selection_ratio, start_layer_idx, end_layer_idx)`` takes ``floor(N * selection_ratio)`` tokens of each
sample out of the sequence before block ``start_layer_idx`` and puts them back, unchanged, after block
``end_layer_idx`` (both inclusive); the blocks in between compute the other ``N - floor(N * selection_ratio)``
tokens only. Positions are in the tokens before the first block and the conditioning is one vector per sample, so
nothing else changes; the loss is the plain loss on every token, there are no new parameters, and a model trained
this way is the stock model at inference (routing happens only in train mode with gradients enabled).

Three ways in:

- our models take ``routes=`` in `forward` (``MaskedDiTTransformer2DModel`` routes its encoder's visible tokens,
  ``MaskedUViTTransformer2DModel`` its patch tokens);
- ``scheduler.masked_training_loss(model, ..., routes=...)`` draws the kept ids after the mask, the noise level and
  the noise, so a seeded run without routes draws exactly what it drew before;
- diffusers' own ``DiTTransformer2DModel`` and ``PixArtTransformer2DModel`` are routed by module hooks that
  [`token_routing`] installs for the duration of a ``with`` block, so the model class and its saved files stay stock.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
from dataclasses import asdict, dataclass

import torch

from .masking import num_masked_tokens
from .models.attention import gather_tokens, scatter_tokens

ROUTE_KEYS = ("selection_ratio", "start_layer_idx", "end_layer_idx")
# The route the TREAD authors use for DiT-B/2 (12 blocks) and their rule for other depths: start at block 2, end at
# depth - 4, half the tokens routed.
DEFAULT_SELECTION_RATIO = 0.5


def _route_problem(selection_ratio, start_layer_idx, end_layer_idx) -> str | None:
    if (
        isinstance(selection_ratio, bool)
        or not isinstance(selection_ratio, (int, float))
        or not 0 <= selection_ratio < 1
    ):
        return f"selection_ratio must be a number in [0, 1), got {selection_ratio!r}"
    for key, value in (("start_layer_idx", start_layer_idx), ("end_layer_idx", end_layer_idx)):
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{key} must be an int (negative counts from the end), got {value!r}"
    return None


@dataclass(frozen=True)
class Route:
    """One span of blocks that `selection_ratio` of the tokens skip.

    Args:
        selection_ratio (`float`): Fraction of the tokens that skip the span, in ``[0, 1)``; ``floor(N *
            selection_ratio)`` of ``N`` (TREAD's count), the rest are computed by the routed blocks.
        start_layer_idx (`int`): First routed block. Negative counts from the end (``-1`` is the last block).
        end_layer_idx (`int`): Last routed block (inclusive); negative counts from the end.
    """

    selection_ratio: float
    start_layer_idx: int
    end_layer_idx: int

    def __post_init__(self):
        problem = _route_problem(self.selection_ratio, self.start_layer_idx, self.end_layer_idx)
        if problem:
            raise ValueError(f"route {self._describe()}: {problem}")
        object.__setattr__(self, "selection_ratio", float(self.selection_ratio))

    def _describe(self) -> str:
        return json.dumps({key: getattr(self, key) for key in ROUTE_KEYS}, default=repr)

    def to_dict(self) -> dict:
        return asdict(self)

    def resolve(self, num_layers: int) -> Route:
        """This route with non-negative indices into a stack of `num_layers` blocks; a `ValueError` naming the route
        and the rule if it does not fit."""
        start = self.start_layer_idx + num_layers if self.start_layer_idx < 0 else self.start_layer_idx
        end = self.end_layer_idx + num_layers if self.end_layer_idx < 0 else self.end_layer_idx
        for key, value in (("start_layer_idx", start), ("end_layer_idx", end)):
            if not 0 <= value < num_layers:
                raise ValueError(
                    f"route {self._describe()}: {key} must name one of the {num_layers} routable blocks "
                    f"(0 ... {num_layers - 1}, or -{num_layers} ... -1 from the end)"
                )
        if start > end:
            raise ValueError(
                f"route {self._describe()}: start_layer_idx ({start}) must be <= end_layer_idx ({end}) once "
                f"negative indices are resolved against {num_layers} blocks"
            )
        return Route(self.selection_ratio, start, end)

    def num_kept(self, num_tokens: int) -> int:
        """How many of `num_tokens` tokens the routed blocks compute: ``num_tokens - floor(num_tokens * ratio)``."""
        kept = num_tokens - num_masked_tokens(num_tokens, self.selection_ratio)
        if kept < 1:
            raise ValueError(
                f"route {self._describe()}: keeps no token of {num_tokens}; at least one must be computed, so "
                "lower selection_ratio"
            )
        return kept


def default_route(num_layers: int, selection_ratio: float = DEFAULT_SELECTION_RATIO) -> Route:
    """The TREAD authors' placement for a stack of `num_layers` blocks: from block 2 to block ``num_layers - 4``
    (DiT-B/2: 2 ... 8; DiT-XL/2: 2 ... 24), clamped into the stack for shallow models."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    end = max(0, num_layers - 4)
    return Route(selection_ratio, min(2, end), end)


def parse_routes(routes) -> tuple[Route, ...]:
    """Routes from the forms users write: a JSON string (the form SimpleTuner's ``tread_config`` uses,
    ``'[{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -4}]'``), a list of such dicts or of
    [`Route`]s, one dict or `Route`, or `None` / ``"none"`` / ``[]`` for no routing.

    Raises:
        ValueError: malformed JSON, an unknown or missing key, or a value a `Route` refuses; the message names the
            route (by position) and the rule.
    """
    if routes is None:
        return ()
    if isinstance(routes, str):
        text = routes.strip()
        if text.lower() in ("", "none", "[]"):
            return ()
        try:
            routes = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(
                f'routes must be JSON such as \'[{{"selection_ratio": 0.5, "start_layer_idx": 2, '
                f'"end_layer_idx": -4}}]\', got {text!r} ({error.msg})'
            ) from None
    if isinstance(routes, (dict, Route)):
        routes = [routes]
    if not isinstance(routes, (list, tuple)):
        raise ValueError(f"routes must be a list of routes (dicts with keys {list(ROUTE_KEYS)}), got {routes!r}")
    parsed = []
    for index, route in enumerate(routes):
        if isinstance(route, Route):
            parsed.append(route)
            continue
        if not isinstance(route, dict):
            raise ValueError(f"route {index} must be a dict with keys {list(ROUTE_KEYS)}, got {route!r}")
        unknown = sorted(set(route) - set(ROUTE_KEYS))
        missing = [key for key in ROUTE_KEYS if key not in route]
        if unknown or missing:
            raise ValueError(
                f"route {index} {json.dumps(route, default=repr)} must have exactly the keys {list(ROUTE_KEYS)}"
                + (f"; unknown: {unknown}" if unknown else "")
                + (f"; missing: {missing}" if missing else "")
            )
        problem = _route_problem(*(route[key] for key in ROUTE_KEYS))
        if problem:
            raise ValueError(f"route {index} {json.dumps(route, default=repr)}: {problem}")
        parsed.append(Route(**route))
    return tuple(parsed)


def resolve_routes(routes, num_layers: int) -> tuple[Route, ...]:
    """[`parse_routes`], then every route resolved against `num_layers` blocks, and the list checked: in order of
    their blocks and not overlapping (a route starts after the previous one ends)."""
    resolved = tuple(route.resolve(num_layers) for route in parse_routes(routes))
    for previous, route in zip(resolved, resolved[1:]):
        if route.start_layer_idx <= previous.end_layer_idx:
            raise ValueError(
                f"route {route._describe()} must start after the previous route "
                f"{previous._describe()} ends: routes are listed in block order and do not overlap"
            )
    return resolved


def routes_to_json(routes) -> str | None:
    """The JSON form of `routes` (as given, negative indices kept), or `None` for no routing: what run configs and
    model cards record."""
    routes = parse_routes(routes)
    return json.dumps([route.to_dict() for route in routes]) if routes else None


def draw_route_ids(
    routes: tuple[Route, ...],
    batch_size: int,
    num_tokens: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, ...]:
    """The ids of the tokens each route computes, ``(batch_size, route.num_kept(num_tokens))`` per route, in grid
    order: a uniform random subset per sample (``argsort(rand(batch_size, num_tokens))``, one ``torch.rand`` per
    route, from `generator` on its device when one is given), the same count for the whole batch."""
    ids = []
    rand_device = generator.device if generator is not None else (device or "cpu")
    for route in routes:
        kept = route.num_kept(num_tokens)
        noise = torch.rand(batch_size, num_tokens, generator=generator, device=rand_device)  # [B, N]
        chosen = noise.argsort(dim=1)[:, :kept].sort(dim=1).values  # [B, K], in grid order
        ids.append(chosen.to(device) if device is not None else chosen)
    return tuple(ids)


class RoutePlan:
    """The routes of one forward through a stack of blocks, with their ids: call `enter(i, x)` before block ``i``
    and `leave(i, x)` after it. `enter` keeps the sequence and gathers the kept tokens where a route starts;
    `leave` scatters the computed tokens into the kept sequence where it ends.

    The first `num_fixed` tokens of the sequence (U-ViT's time and label tokens) are never routed: every block sees
    them and `leave` takes their new values."""

    def __init__(self, routes: tuple[Route, ...], ids: tuple[torch.Tensor, ...], num_fixed: int = 0):
        self.starts = {route.start_layer_idx: k for k, route in enumerate(routes)}
        self.ends = {route.end_layer_idx: k for k, route in enumerate(routes)}
        self.ids = ids
        self.num_fixed = num_fixed
        self._saved = [None] * len(routes)

    def enter(self, index: int, x: torch.Tensor) -> torch.Tensor:
        k = self.starts.get(index)
        if k is None:
            return x
        self._saved[k] = x
        fixed = self.num_fixed
        kept = gather_tokens(x[:, fixed:], self.ids[k])
        return torch.cat([x[:, :fixed], kept], dim=1) if fixed else kept

    def leave(self, index: int, x: torch.Tensor) -> torch.Tensor:
        k = self.ends.get(index)
        if k is None:
            return x
        saved, self._saved[k] = self._saved[k], None
        fixed = self.num_fixed
        full = scatter_tokens(saved[:, fixed:], self.ids[k], x[:, fixed:])
        return torch.cat([x[:, :fixed], full], dim=1) if fixed else full


def plan_routes(
    routes,
    route_ids,
    num_layers: int,
    batch_size: int,
    num_tokens: int,
    device,
    num_fixed: int = 0,
) -> RoutePlan | None:
    """What a model's `forward` makes of its ``routes=`` and ``route_ids=`` arguments: `None` (no routing) unless
    routes are given, the model is in train mode and gradients are enabled; else a [`RoutePlan`] whose ids are
    `route_ids` (checked for shape, not read) or drawn from torch's global generator."""
    routes = resolve_routes(routes, num_layers)
    if not routes:
        if route_ids:
            raise ValueError("route_ids were given without routes")
        return None
    if route_ids is None:
        route_ids = draw_route_ids(routes, batch_size, num_tokens, device=device)
    if isinstance(route_ids, torch.Tensor):
        route_ids = (route_ids,)
    if len(route_ids) != len(routes):
        raise ValueError(
            f"route_ids must hold one (batch, kept) tensor per route ({len(routes)}), got {len(route_ids)}"
        )
    for route, ids in zip(routes, route_ids):
        expected = (batch_size, route.num_kept(num_tokens))
        if not isinstance(ids, torch.Tensor) or tuple(ids.shape) != expected or ids.dtype != torch.long:
            raise ValueError(
                f"route_ids for route {route._describe()} must be a long tensor of shape {expected} (the kept ids "
                f"of {num_tokens} tokens), got "
                f"{(ids.dtype, tuple(ids.shape)) if isinstance(ids, torch.Tensor) else type(ids).__name__}"
            )
    return RoutePlan(routes, tuple(ids.to(device) for ids in route_ids), num_fixed)


def routing_active(model: torch.nn.Module) -> bool:
    """Routing applies only to a model in train mode with gradients enabled; otherwise the forward is the stock one."""
    return model.training and torch.is_grad_enabled()


# ----------------------------------------------------------------------------------------------------------------
# diffusers' own transformers, by hooks
# ----------------------------------------------------------------------------------------------------------------

HOOKED_CLASSES = ("DiTTransformer2DModel", "PixArtTransformer2DModel")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a `DistributedDataParallel` or `torch.compile` wrapper (itself if none)."""
    # DistributedDataParallel (and torch.compile's wrapper) keep the model in `.module` / `._orig_mod`.
    for attribute in ("module", "_orig_mod"):
        inner = getattr(model, attribute, None)
        if isinstance(inner, torch.nn.Module):
            return unwrap_model(inner)
    return model


def _check_hookable(model) -> None:
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    if isinstance(model, (DiTTransformer2DModel, PixArtTransformer2DModel)):
        return
    name = type(model).__name__
    hint = ""
    if name.startswith("Masked"):
        hint = f"; {name} routes by itself: pass routes= to its forward or to masked_training_loss"
    raise TypeError(
        f"token_routing supports diffusers' {' and '.join(HOOKED_CLASSES)} (blocks in `transformer_blocks`, hidden "
        f"states as their first argument and output), got {name}{hint}"
    )


class _HookState:
    """What the hooks of one `token_routing` block share. The ids are drawn once per model forward (in the model's
    pre-hook, never in a block's), because gradient checkpointing runs the routed blocks, hooks included, again in
    backward: the replay must gather and scatter with the same ids and the same saved sequence."""

    def __init__(self, model, routes, generator):
        self.model = model
        self.routes = routes
        self.generator = generator
        self.ids = None
        self.saved = [None] * len(routes)
        self.paused = False
        self.pending = False  # a checkpointed routed forward whose backward has not started
        self.last_ids = None
        self._signature = inspect.signature(model.forward)

    def _checkpointing(self) -> bool:
        return bool(getattr(self.model, "gradient_checkpointing", False))

    def model_pre_hook(self, module, args, kwargs):
        if not routing_active(module):
            self.paused = True  # an eval / no_grad forward between a routed forward and its backward
            return None
        self.paused = False
        if self.pending and self._checkpointing():
            raise RuntimeError(
                "token_routing: a second routed forward before the backward of the first, with gradient "
                "checkpointing on; the blocks' recomputation in backward would use the second forward's tokens. "
                "Call backward after each forward, or run forwards you do not backpropagate under torch.no_grad()"
            )
        bound = self._signature.bind(*args, **kwargs)
        arguments = bound.arguments
        if arguments.get("attention_mask") is not None:
            raise ValueError(
                "token_routing cannot route a self-attention attention_mask (it masks image tokens, which routing "
                "drops); pass attention_mask=None while routing (the text's encoder_attention_mask is fine)"
            )
        if (arguments.get("cross_attention_kwargs") or {}).get("gligen") is not None:
            raise ValueError("token_routing cannot route GLIGEN's per-token inputs (cross_attention_kwargs['gligen'])")
        hidden_states = arguments["hidden_states"]
        batch, _, height, width = hidden_states.shape
        patch = self.model.config.patch_size
        num_tokens = (height // patch) * (width // patch)
        self.ids = draw_route_ids(self.routes, batch, num_tokens, self.generator, hidden_states.device)
        self.last_ids = self.ids
        self.saved = [None] * len(self.routes)
        return None

    def model_hook(self, module, args, kwargs, output):
        if self.paused:
            self.paused = False
            return None
        if not self._checkpointing():
            # No replay in backward: let go of the saved sequences now.
            self.ids, self.saved = None, [None] * len(self.routes)
            return None
        sample = output[0] if isinstance(output, tuple) else output.sample
        if sample.requires_grad:
            self.pending = True
            sample.register_hook(self._backward_started)
        return None

    def _backward_started(self, grad):
        self.pending = False

    def _routing(self) -> bool:
        return self.ids is not None and not self.paused

    @staticmethod
    def _hidden_states(args, kwargs) -> torch.Tensor:
        return args[0] if args else kwargs["hidden_states"]

    def start_hook(self, k, module, args, kwargs):
        if not self._routing():
            return None
        hidden_states = self._hidden_states(args, kwargs)
        self.saved[k] = hidden_states
        kept = gather_tokens(hidden_states, self.ids[k])
        if args:
            return (kept, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kept}

    def end_hook(self, k, module, args, kwargs, output):
        if not self._routing():
            return None
        return scatter_tokens(self.saved[k], self.ids[k], output)


class TokenRouting:
    """What `with token_routing(...) as routing` gives: the resolved `routes`, `last_ids` (the ids of the last routed
    forward, one ``(batch, kept)`` tensor per route) and the settable `generator` the ids are drawn from."""

    def __init__(self, state: _HookState):
        self._state = state
        self.routes = state.routes

    @property
    def last_ids(self) -> tuple[torch.Tensor, ...] | None:
        return self._state.last_ids

    @property
    def generator(self) -> torch.Generator | None:
        """Where the next forward draws its ids from; a training loop sets its step's generator here, so that the
        ids are drawn after the step's other draws and a resumed run draws the same."""
        return self._state.generator

    @generator.setter
    def generator(self, generator: torch.Generator | None) -> None:
        self._state.generator = generator


@contextlib.contextmanager
def token_routing(model: torch.nn.Module, routes, generator: torch.Generator | None = None):
    """Route tokens through a stock diffusers ``DiTTransformer2DModel`` or ``PixArtTransformer2DModel`` for the
    duration of a ``with`` block, by module hooks: a model pre-hook draws each forward's ids (from `generator`), a
    pre-hook on block ``start`` gathers the kept tokens and a hook on block ``end`` scatters them back into the
    sequence that entered block ``start``. The model's class, config and `save_pretrained` output are untouched,
    and the hooks are removed when the block exits, also on an exception.

    Keep backward inside the ``with`` block when gradient checkpointing is on: it replays the routed blocks, hooks
    included. Only forwards in train mode with gradients enabled are routed; others are the stock forward. PixArt's
    text tokens are cross-attention keys and are never routed.

    Example::

        with token_routing(transformer, '[{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -4}]'):
            loss = scheduler.masked_training_loss(transformer, latents, class_labels=labels).loss
            loss.backward()

    Raises:
        TypeError: for any other model class (our own models take ``routes=`` in `forward`).
        ValueError: for invalid routes, naming the route and the rule; at forward time for inputs routing cannot
            handle (a PixArt self-attention ``attention_mask``, GLIGEN inputs).
    """
    module = unwrap_model(model)
    _check_hookable(module)
    blocks = module.transformer_blocks
    resolved = resolve_routes(routes, len(blocks))
    compiled = [i for i, block in enumerate(blocks) if getattr(block, "_compiled_call_impl", None) is not None]
    if compiled:
        raise ValueError(
            f"token_routing hooks blocks {compiled}, which are compiled (module.compile()); compiled blocks do not "
            "run Python hooks reliably. Route first, compile the model afterwards, or do not compile its blocks"
        )
    state = _HookState(module, resolved, generator)
    handles = []
    try:
        if resolved:
            handles.append(module.register_forward_pre_hook(state.model_pre_hook, with_kwargs=True))
            handles.append(module.register_forward_hook(state.model_hook, with_kwargs=True))
            for k, route in enumerate(resolved):
                block = blocks[route.start_layer_idx]
                handles.append(block.register_forward_pre_hook(_bind(state.start_hook, k), with_kwargs=True))
                block = blocks[route.end_layer_idx]
                handles.append(block.register_forward_hook(_bind(state.end_hook, k), with_kwargs=True))
        yield TokenRouting(state)
    finally:
        for handle in handles:
            handle.remove()


def _bind(hook, k):
    def bound(*args):
        return hook(k, *args)

    return bound


def routed_fraction(routes, num_layers: int) -> float:
    """The fraction of the blocks' token-work routing saves, to first order (blocks are equal and linear in the
    token count): ``sum(ratio * span) / num_layers``."""
    resolved = resolve_routes(routes, num_layers)
    saved = sum(route.selection_ratio * (route.end_layer_idx - route.start_layer_idx + 1) for route in resolved)
    return saved / num_layers if num_layers else math.nan
