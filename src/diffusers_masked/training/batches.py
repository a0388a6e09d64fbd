"""Deterministic batches and randomness: the data order, masks, noise and label dropout of a step are functions of
``(seed, step, process)``, not of a running random state, which is what makes a resumed run end with the weights of
an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


class StepBatchSampler:
    """Yields this process's index batches from a given micro-batch onwards.

    Epoch `e` visits the examples in the order of a permutation seeded by (seed, e); micro-batch `b` of the run is
    slice `b mod batches_per_epoch` of epoch `b div batches_per_epoch`, split between processes. The batches are a
    function of `b` alone, which is what makes resuming exact.

    Args:
        num_examples (`int`): size of the dataset.
        batch_size (`int`): per-process batch size.
        num_processes (`int`): processes sharing each global batch.
        process_index (`int`): this process's slice of it.
        seed (`int`): seed of the epochs' permutations.
        start_batch (`int`, defaults to 0): the first micro-batch to yield.
    """

    def __init__(self, num_examples, batch_size, num_processes, process_index, seed, start_batch=0):
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        self.start_batch = start_batch
        self.global_batch = batch_size * num_processes
        self.batches_per_epoch = num_examples // self.global_batch
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"the dataset has {num_examples} examples, fewer than one global batch "
                f"({batch_size} per process x {num_processes} processes); lower the batch size"
            )

    def _permutation(self, epoch):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_examples, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        batch, epoch, order = self.start_batch, None, None
        while True:
            this_epoch, index = divmod(batch, self.batches_per_epoch)
            if this_epoch != epoch:
                epoch, order = this_epoch, self._permutation(this_epoch)
            begin = index * self.global_batch + self.process_index * self.batch_size
            yield order[begin : begin + self.batch_size].tolist()
            batch += 1


def step_generator(seed: int, step: int, process_index: int, device) -> torch.Generator:
    """The random source of one optimizer step on one process (masks, noise, label dropout)."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + step) * 1_009 + process_index)
    return generator


def check_batch_sizes(accelerator, num_examples: int, batch_sizes: Sequence[int]) -> None:
    """Every phase's batch must fit the data now, not hours in when its phase begins (`StepBatchSampler` raises)."""
    for batch_size in batch_sizes:
        StepBatchSampler(num_examples, batch_size, accelerator.num_processes, accelerator.process_index, seed=0)
