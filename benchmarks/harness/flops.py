"""Forward FLOPs as torch's `FlopCounterMode` counts them, plus the attention it misses on CPU."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

# torch's FlopCounterMode has formulas for the CUDA SDPA kernels but not for this CPU one, so on CPU attention's
# QK^T and AV products go uncounted. Counting them here through custom_mapping keeps them a separate line.
CPU_SDPA_OPS = [torch.ops.aten._scaled_dot_product_flash_attention_for_cpu]


def attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and (softmax)V: 2 matmuls of 2*B*heads*N_q*N_k*head_dim FLOPs each."""
    batch, heads, num_queries, head_dim = query_shape
    num_keys = key_shape[-2]
    return 4 * batch * heads * num_queries * num_keys * head_dim


def count_forward_flops(forward) -> tuple[int, int]:
    """FLOPs of ``forward()`` (a no-argument callable, run under `no_grad`) as torch's FlopCounterMode counts them,
    and the SDPA FLOPs it leaves out on CPU."""
    counter = FlopCounterMode(display=False, custom_mapping=dict.fromkeys(CPU_SDPA_OPS, attention_flops))
    with counter, torch.no_grad():
        forward()
    by_op = counter.get_flop_counts()["Global"]
    attention = sum(by_op.get(op, 0) for op in CPU_SDPA_OPS)
    return counter.get_total_flops() - attention, attention
