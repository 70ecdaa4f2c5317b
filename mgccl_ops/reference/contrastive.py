"""Plain-PyTorch contrastive loss (DESIGN.md op 1), materialising the N x M logits."""

from __future__ import annotations

import torch

from mgccl_ops.ops._dtypes import accumulation_dtype


def reduce_rows(per_row: torch.Tensor, weight: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduces weighted row losses [N]; ``weight`` [N] is already 0 on ignored rows.

    "mean" divides by the total weight, giving 0 (with zero gradients) when that is 0.
    """
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    weight_sum = weight.sum()
    return total / torch.where(weight_sum > 0, weight_sum, torch.ones_like(weight_sum))


def contrastive_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    pos: torch.Tensor,
    scale: float | torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    symmetric: bool = False,
) -> torch.Tensor:
    """Reference of :func:`mgccl_ops.contrastive_loss`: q [N, D], k [M, D], pos [N] -> loss."""
    acc = accumulation_dtype(q.dtype)
    n, m = q.shape[0], k.shape[0]
    valid = pos >= 0
    w = valid.to(acc) if weight is None else weight.to(acc) * valid
    if m == 0 or n == 0:
        row_loss = (q.to(acc).sum(1) + (scale * 0 if isinstance(scale, torch.Tensor) else 0)) * 0
    else:
        logits = scale * (q.to(acc) @ k.to(acc).T)  # [N, M]
        target = pos.clamp_min(0)
        pos_logit = logits.gather(1, target[:, None]).squeeze(1)
        row_lse = torch.logsumexp(logits, dim=1)
        if symmetric:
            col_lse = torch.logsumexp(logits, dim=0)
            row_loss = 0.5 * (row_lse + col_lse[target]) - pos_logit
        else:
            row_loss = row_lse - pos_logit
        row_loss = torch.where(valid, row_loss, torch.zeros_like(row_loss))
    per_row = row_loss * w if weight is not None else row_loss
    return reduce_rows(per_row, w, reduction)
