"""Reduction names of the loss ops (``contrastive_loss``, ``hard_negative_loss``, ...).

"none" keeps the [N] weighted row losses, "sum" adds them, "mean" divides the sum by the sum
of the weights of the rows that have a positive (0 when that sum is 0).
"""

from __future__ import annotations

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(op: str, reduction: object) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction should be one of {REDUCTIONS}, got {reduction!r}")
