"""Batches of a map-style data set split across ranks and gradient-accumulation steps."""

from __future__ import annotations

import torch


class RankStepBatchSampler(torch.utils.data.Sampler):
    """Micro-batches of ``batch_size`` indices for one rank.

    Optimiser step ``s`` draws ``accum_steps * world * batch_size`` indices from a generator
    seeded with ``(seed, s)``; micro-step ``a`` of rank ``r`` takes the slice
    ``[(a * world + r) * batch_size, ...)``. The global batch of a step depends only on the
    seed and the step number, whatever the world size, so a resumed run reads exactly the
    batches an uninterrupted one would; with one rank and no accumulation the batches are
    :class:`mgccl_ops.data.collate.StepBatchSampler`'s.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        start: int,
        stop: int,
        *,
        rank: int = 0,
        world: int = 1,
        accum_steps: int = 1,
    ):
        if num_samples < 1 or batch_size < 1 or accum_steps < 1:
            raise ValueError(
                f"need num_samples, batch_size and accum_steps >= 1, got {num_samples}, {batch_size}, {accum_steps}"
            )
        if not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world, got rank {rank} and world {world}")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.start, self.stop = start, stop
        self.rank, self.world, self.accum_steps = rank, world, accum_steps

    def __len__(self) -> int:
        return max(self.stop - self.start, 0) * self.accum_steps

    def __iter__(self):
        per_step = self.accum_steps * self.world * self.batch_size
        for step in range(self.start, self.stop):
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            drawn = torch.randint(self.num_samples, (per_step,), generator=gen)
            for micro in range(self.accum_steps):
                first = (micro * self.world + self.rank) * self.batch_size
                yield drawn[first : first + self.batch_size].tolist()
