"""The library every training script uses, one module per concern.

- `arguments`: the flag groups the scripts share, their checks, and parsed flags -> the other modules' arguments
  (the only module that sees an `argparse.Namespace`).
- `phases`: `Phase`, `build_phases`, the learning rate at a step.
- `batches`: the step-indexed resumable batch order and the per-step random generators.
- `data`: the training set (Hub dataset, image folder or the built-in digits; optional cached latents).
- `models`: the model a run starts from, its runtime options, the optimizer and EMA (`prepare_training`).
- `checkpoints`: save, list, check and restore checkpoints; their total limit and lineage.
- `ema`: the EMA (sharded or not): save, load, swap in for validation, export.
- `distributed`: the `Accelerator`, FSDP2, CPU threads, checks that keep the ranks in step.
- `loop`: the loop (phases x steps, accumulation, clipping, EMA, logging, periodic saves), which calls the script's
  own ``training_step``.
- `validation`: sample grids and the built-in digits evaluation.
- `run`: start a run (lock, lineage, resume), record it, finish it (final pipeline, card, evaluation, Hub).

A training script reads as its method: it defines ``training_step(batch, generator, mask_ratio, ...)`` (what is
drawn, what is called, what is returned) and makes one call into each module above in order; see
``examples/train_maskdit.py`` and the Architecture page of the docs.
"""
