"""The benchmark harness, kept apart from the measurements beside it (one file per measurement in benchmarks/):

- `isolation`: one fresh process per measured configuration (its own peak memory, its own allocator), driven step by
  step from the parent so compared configurations take turns on a shared machine.
- `statistics`: paired ratios and a bootstrap interval of their median.
- `flops`: forward FLOPs as torch's FlopCounterMode counts them, plus the CPU attention kernel it misses.
- `report`: the machine a number was measured on, tables, JSON.

A measurement script puts this folder's parent on `sys.path` (``benchmarks/``) and imports ``harness``.
"""
