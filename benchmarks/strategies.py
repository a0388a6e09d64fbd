#!/usr/bin/env python
"""Training strategies on one clock: plain training, MaskDiT masking, TREAD token routing, and both together.

    python benchmarks/strategies.py                    # 4 arms x 3 seeds on the built-in digits, + per-step shapes
    python benchmarks/strategies.py --skip_shapes      # the digits arms only
    python benchmarks/strategies.py --shapes_only      # the per-step cost of TREAD at DiT-S/2, B/2, XL/2 only
    python benchmarks/strategies.py --quick            # a smoke test of the whole path (a minute)

Part 1, quality against wall-clock (`time_to_quality.py`'s loop, evaluation and comparisons, with these arms): the
built-in digits at 16x16, patch 2 (64 tokens), the default recipe's 6 x 128 transformer, each arm trained for the
same budget of training seconds and evaluated (digits-FID, class accuracy of samples) along the clock:

    plain          the transformer without a decoder, mask 0: a DiT, the baseline
    maskdit        today's default: the 2 x 64 decoder, mask 0.5 + MAE 0.1, unmasking tuning for the last 10%
    tread          the plain DiT with TREAD's route: half of the tokens skip blocks 1..4 of the 6, at every step
    maskdit_tread  maskdit with the same route over its encoder's visible tokens (an experiment)

The route: TREAD routes half of the tokens from block 2 to block depth - 4 (DiT-B/2: 2..8 of 12). On 6 blocks that
rule routes one block; blocks 1..4 keep the same proportions as 2..8 of 12 (start after the first sixth, end with a
third of the depth left; the authors: "long routes", "not at layer 0", "end before the final layers").

Reported per arm and seed: seconds per step relative to plain, final FID and accuracy, and the wall-clock at which
it reaches plain's final FID and final accuracy, as a share of the budget (target: <= 0.5 on every seed for one
strategy). Part 2: one training step (forward, backward, AdamW) of diffusers' own `DiTTransformer2DModel` at the
S/2, B/2 and XL/2 shapes (256 tokens, ImageNet-256 latents), plain and under `token_routing` with TREAD's route
(ratio 0.5, blocks 2..depth-4), timed alternately; the reference is the forward-FLOP ratio. Writes
benchmarks/results/strategies.json and strategies.png.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import time_to_quality as ttq  # noqa: E402
from harness.flops import CPU_SDPA_OPS, attention_flops  # noqa: E402
from harness.report import format_table, machine, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DIGITS_ROUTE = json.dumps([{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": 4}])
QUICK_ROUTE = json.dumps([{"selection_ratio": 0.5, "start_layer_idx": 0, "end_layer_idx": 0}])
TREAD_ROUTE = json.dumps([{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -4}])


def arms(route: str) -> dict[str, ttq.Arm]:
    mask = dict(mask_ratio=0.5, mae_loss_weight=0.1, unmask_fraction=0.1, baseline="plain")
    return {
        "plain": ttq.Arm("maskdit", 0.0, decoder=False),
        "maskdit": ttq.Arm("maskdit", **mask),
        "tread": ttq.Arm("maskdit", 0.0, decoder=False, routes=route, baseline="plain"),
        "maskdit_tread": ttq.Arm("maskdit", **mask, routes=route),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget_seconds", type=float, default=300.0, help="Training seconds per arm and seed.")
    parser.add_argument("--num_evals", type=int, default=6)
    parser.add_argument("--arms", nargs="+", default=["plain", "maskdit", "tread", "maskdit_tread"])
    parser.add_argument("--sizes", nargs="+", default=["S/2", "B/2", "XL/2"])
    parser.add_argument("--shape_repeats", type=int, default=5, help="Timed steps per arm and size (alternating).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip_shapes", action="store_true")
    parser.add_argument("--shapes_only", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "strategies.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.shape_repeats = ["S/2"], 1
    return args


# ------------------------------------------------------------------------------------------------ part 2


def stock_dit(size: str):
    from diffusers import DiTTransformer2DModel

    from diffusers_masked.training.models import disable_label_dropout, dit_preset_config

    config = {**dit_preset_config(size), "sample_size": 32, "in_channels": 4, "out_channels": 4}
    return disable_label_dropout(DiTTransformer2DModel(**config)).train()


def routed_forward_flops(model, inputs, routes) -> int:
    """Forward FLOPs in train mode with gradients on (where routing is active), CPU attention included."""
    from torch.utils.flop_counter import FlopCounterMode

    from diffusers_masked.routing import token_routing

    counter = FlopCounterMode(display=False, custom_mapping=dict.fromkeys(CPU_SDPA_OPS, attention_flops))
    with token_routing(model, routes or "[]"), counter:
        model(**inputs).sample.sum()
    return counter.get_total_flops()


def train_step(model, optimizer, inputs, routes) -> float:
    """Seconds of one forward, backward and AdamW step, under `token_routing` with `routes` (none: plain)."""
    from diffusers_masked.routing import token_routing

    start = time.perf_counter()
    with token_routing(model, routes or "[]"):
        model(**inputs).sample.square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def shape_costs(args) -> list[dict]:
    rows = []
    for size in args.sizes:
        torch.manual_seed(0)
        model = stock_dit(size)
        batch = 2 if size.startswith("XL") else 8
        inputs = {
            "hidden_states": torch.randn(batch, 4, 32, 32),
            "timestep": torch.randint(0, 1000, (batch,)),
            "class_labels": torch.randint(0, 1000, (batch,)),
        }
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        flops = {
            arm: routed_forward_flops(model, inputs, routes)
            for arm, routes in (("plain", None), ("tread", TREAD_ROUTE))
        }

        step = functools.partial(train_step, model, optimizer, inputs)
        step(None), step(TREAD_ROUTE)  # warm-up
        times = {"plain": [], "tread": []}
        for _ in range(args.shape_repeats):
            times["plain"].append(step(None))
            times["tread"].append(step(TREAD_ROUTE))
        plain, tread = statistics.median(times["plain"]), statistics.median(times["tread"])
        rows.append({
            "size": size, "num_layers": model.config.num_layers, "batch": batch, "tokens": 256,
            "route": f"ratio 0.5, blocks 2..{model.config.num_layers - 4}",
            "plain_step_s": plain, "tread_step_s": tread, "step_ratio": tread / plain,
            "flop_ratio": flops["tread"] / flops["plain"], "times": times,
        })  # fmt: skip
        print(f"  {size}: plain {plain:.3f} s, tread {tread:.3f} s, ratio {tread / plain:.3f} "
              f"(FLOPs {flops['tread'] / flops['plain']:.3f})", flush=True)  # fmt: skip
    return rows


SHAPE_COLUMNS = [
    ("model", "size", ""),
    ("route", "route", ""),
    ("batch", "batch", "d"),
    ("plain step (s)", "plain_step_s", ".3f"),
    ("TREAD step (s)", "tread_step_s", ".3f"),
    ("time ratio", "step_ratio", ".3f"),
    ("forward-FLOP ratio", "flop_ratio", ".3f"),
]


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    record = {
        "command": "python benchmarks/strategies.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
    }
    if not args.shapes_only:
        ttq.ARMS.update(arms(QUICK_ROUTE if args.quick else DIGITS_ROUTE))
        digits_argv = ["--arms", *args.arms, "--seeds", *map(str, args.seeds), "--num_evals", str(args.num_evals)]
        digits_argv += ["--budget_seconds", str(args.budget_seconds), "--threads", str(args.threads)]
        digits_argv += ["--output", str(Path(args.output).with_name(Path(args.output).stem + "_digits.json"))]
        digits_argv += ["--plot", str(Path(args.output).with_suffix(".png"))]
        if args.quick:
            digits_argv.append("--quick")
        digits = ttq.main(digits_argv)
        record["digits"] = {k: digits[k] for k in ("settings", "runs", "comparisons", "summary")}
        record["digits"]["arms"] = {name: vars(arm) for name, arm in ttq.ARMS.items() if name in args.arms}
        Path(digits_argv[digits_argv.index("--output") + 1]).unlink()  # all of it is in this record
    if not args.skip_shapes:
        record["shapes"] = shape_costs(args)
        print(format_table(record["shapes"], SHAPE_COLUMNS))
    write_json(args.output, record)
    return record


if __name__ == "__main__":
    main()
