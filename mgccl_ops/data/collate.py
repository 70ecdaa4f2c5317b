"""Batching of image-caption samples with their entity phrases."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def collate_pairs(samples: Sequence[dict]) -> dict:
    """Stack samples with ``image`` [3, H, W], ``caption`` and ``entities`` into one batch.

    Returns a dict with ``images`` uint8 [B, 3, H, W], ``captions`` list[str] (B),
    ``phrases`` list[str] (U distinct entity phrases, in first-seen order) and
    ``entity_ids`` int64 [B, E] (E = most entities of one caption; -1 = empty slot), where
    equal ids mean equal phrase text. ``masks`` [B, H, W] is added when every sample has one.
    """
    phrases: dict[str, int] = {}
    width = max((len(s["entities"]) for s in samples), default=0)
    entity_ids = torch.full((len(samples), width), -1, dtype=torch.int64)
    for row, sample in enumerate(samples):
        for slot, phrase in enumerate(sample["entities"]):
            entity_ids[row, slot] = phrases.setdefault(phrase, len(phrases))
    batch = {
        "images": torch.stack([s["image"] for s in samples]),
        "captions": [s["caption"] for s in samples],
        "phrases": list(phrases),
        "entity_ids": entity_ids,
    }
    if samples and all("mask" in s for s in samples):
        batch["masks"] = torch.stack([s["mask"] for s in samples])
    return batch


class StepBatchSampler(torch.utils.data.Sampler):
    """Batch ``s`` holds indices drawn by a generator seeded with ``(seed, s)``.

    A batch depends only on the seed and its step number, so training resumed at step
    ``start`` reads exactly the batches an uninterrupted run would have read.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, start: int, stop: int):
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"need num_samples >= 1 and batch_size >= 1, got {num_samples}, {batch_size}")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.start, self.stop = start, stop

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __iter__(self):
        for step in range(self.start, self.stop):
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            yield torch.randint(self.num_samples, (self.batch_size,), generator=gen).tolist()
