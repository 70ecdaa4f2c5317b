"""Plain-PyTorch multi-grained loss (DESIGN.md op 4): one loss per level, weighted and summed."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mgccl_ops.reference.contrastive import contrastive_loss
from mgccl_ops.reference.mining import hard_negative_loss, topk_hard_negatives


def multi_grained_loss(
    levels: Sequence[tuple],
    k: torch.Tensor,
    scale: float | torch.Tensor,
    *,
    k_group: torch.Tensor | None = None,
    hard_negatives: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`mgccl_ops.multi_grained_loss`.

    levels: ``(q_l [N_l, D], pos_l [N_l], weight_l)`` or ``(q_l, pos_l, weight_l, q_group_l [N_l])``;
    k [M, D]; k_group [M]. Returns ``total = sum_l weight_l * mean_loss_l`` (0-dim) over
    the levels that have a row with a positive, and the detached per-level mean losses [L].
    With ``hard_negatives=K`` each level mines ``min(K, M)`` negatives per row (excluding the
    positive and same-group keys) and uses the hard-negative loss; otherwise the full softmax
    over ``k``.
    """
    losses = []
    for level in levels:
        q_l, pos_l, _ = level[:3]
        q_group_l = level[3] if len(level) > 3 else None
        if hard_negatives is None:
            losses.append(contrastive_loss(q_l, k, pos_l, scale))
            continue
        neg_idx, _ = topk_hard_negatives(
            q_l,
            k,
            min(hard_negatives, k.shape[0]),
            pos=pos_l,
            q_group=q_group_l,
            k_group=k_group,
        )
        losses.append(hard_negative_loss(q_l, k, pos_l, neg_idx, scale))
    per_level = torch.stack(losses)
    # A level without rows that have a positive contributes nothing, whatever its weight (an
    # infinite weight times its mean loss of 0 would be NaN).
    total = sum(
        (float(level[2]) * loss for level, loss in zip(levels, losses) if bool((level[1] >= 0).any())),
        per_level.new_zeros(()),
    )
    return total, per_level.detach()
