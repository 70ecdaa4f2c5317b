""":func:`mgccl_ops.multi_grained_loss` as a module: the levels' names and weights are its config."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import mgccl_ops

MODULE = "MultiGrainedLoss"


class MultiGrainedLoss(nn.Module):
    """Weighted sum of per-level contrastive losses against one shared key bank, in one pass.

    Args:
        weights: one float per level, e.g. ``{"part": 1.0, "pixel": 0.5}`` (a mapping names the
            levels) or ``[1.0, 0.5]``.
        hard_negatives: None for the full softmax over the bank; K to mine K negatives per row
            (excluding the positive and same-group keys) and use the hard-negative loss.

    ``forward(levels, k, scale, k_group=None, output_dict=False)``: ``levels`` holds, per level
    and in the order of ``weights``, ``(q [N_l, D], pos [N_l] int64)`` or
    ``(q, pos, q_group [N_l] int64)``; ``k`` [M, D] is the key bank, ``scale`` a float or 0-dim
    tensor (exponentiated). Returns the 0-dim total, or with ``output_dict`` a dict of the total
    (``"multi_grained_loss"``) and each level's detached mean loss under its name.
    """

    def __init__(self, weights: Sequence[float] | dict[str, float], hard_negatives: int | None = None) -> None:
        super().__init__()
        if isinstance(weights, dict):
            self.names, values = list(weights), list(weights.values())
        else:
            values = list(weights)
            self.names = [f"level_{index}" for index in range(len(values))]
        if not values:
            raise ValueError(f"{MODULE}: weights should name at least one level, got {weights!r}")
        for name, value in zip(self.names, values):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{MODULE}: the weight of level {name!r} should be a float, got {type(value).__name__}")
        self.weights = [float(value) for value in values]
        self.hard_negatives = hard_negatives

    def forward(
        self,
        levels: Sequence[tuple[torch.Tensor, ...]],
        k: torch.Tensor,
        scale: float | torch.Tensor,
        k_group: torch.Tensor | None = None,
        output_dict: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        if len(levels) != len(self.weights):
            raise ValueError(f"{MODULE}: configured with {len(self.weights)} levels {self.names}, got {len(levels)}")
        op_levels = []
        for name, weight, level in zip(self.names, self.weights, levels):
            if not isinstance(level, (tuple, list)) or len(level) not in (2, 3):
                raise ValueError(f"{MODULE}: level {name!r} should be (q, pos) or (q, pos, q_group), got {level!r:.80}")
            q, pos, *group = level
            op_levels.append((q, pos, weight, *group))
        total, per_level = mgccl_ops.multi_grained_loss(
            op_levels, k, scale, k_group=k_group, hard_negatives=self.hard_negatives
        )
        if not output_dict:
            return total
        return {"multi_grained_loss": total, **dict(zip(self.names, per_level.unbind()))}

    def extra_repr(self) -> str:
        return f"weights={dict(zip(self.names, self.weights))}, hard_negatives={self.hard_negatives}"
