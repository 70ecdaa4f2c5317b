"""Plain-PyTorch contrastive loss (DESIGN.md op 1), materialising the N x M logits."""

from __future__ import annotations

import torch

from mgccl_ops.ops._dtypes import accumulation_dtype


def row_weights(weight: torch.Tensor | None, pos: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """[N] weights of the rows in ``acc``: ``weight[i]`` (1 without weights) where ``pos[i] >= 0``
    and exactly 0 on ignored rows, whatever their weight (NaN or inf included)."""
    valid = pos >= 0
    if weight is None:
        return valid.to(acc)
    return torch.where(valid, weight.to(acc), torch.zeros((), dtype=acc, device=weight.device))


def check_finite_scale(op: str, scale: float | torch.Tensor) -> None:
    """A non-finite scale is refused (ValueError), as the fused ops refuse it (a scale on the
    meta device has no value to check)."""
    if isinstance(scale, torch.Tensor) and scale.device.type == "meta":
        return
    value = float(scale.detach()) if isinstance(scale, torch.Tensor) else float(scale)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{op}: scale should be finite, got {value}")


def reduce_rows(per_row: torch.Tensor, weight: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduces weighted row losses [N]; ``weight`` [N] is already 0 on ignored rows.

    "mean" divides by the total weight W whatever its sign (NaN when a weight is NaN); it is 0
    (with zero gradients) only when W == 0 exactly.
    """
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    weight_sum = weight.sum()
    nonzero = weight_sum != 0
    mean = total / torch.where(nonzero, weight_sum, torch.ones_like(weight_sum))
    return torch.where(nonzero, mean, torch.zeros_like(mean))


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
    check_finite_scale("contrastive_loss", scale)
    acc = accumulation_dtype(q.dtype)
    n, m = q.shape[0], k.shape[0]
    valid = pos >= 0
    w = row_weights(weight, pos, acc)
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
