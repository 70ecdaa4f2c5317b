"""Plain-PyTorch hard-negative mining and hard-negative loss (DESIGN.md ops 2 and 3).

Both materialise what the fused kernels avoid: the N x M similarity matrix (mining) and the
gathered [N, K, D] key tensor (loss).
"""

from __future__ import annotations

import torch

from mgccl_ops.ops._dtypes import accumulation_dtype
from mgccl_ops.reference.contrastive import check_finite_scale, reduce_rows, row_weights


def allowed_keys(
    n: int,
    m: int,
    device: torch.device,
    pos: torch.Tensor | None = None,
    q_group: torch.Tensor | None = None,
    k_group: torch.Tensor | None = None,
    exclude_self: bool = False,
    sim: torch.Tensor | None = None,
    max_sim: float | None = None,
    margin: float | None = None,
) -> torch.Tensor:
    """[N, M] bool: whether key j may be returned for row i (the mining contract).

    Key j is not allowed if ``j == pos[i]``, ``k_group[j] == q_group[i]``, ``exclude_self`` and
    ``j == i``, ``sim[i, j] > max_sim``, ``sim[i, j] > sim[i, pos[i]] - margin`` (rows with
    ``pos[i] >= 0``), or ``sim[i, j]`` is NaN. ``sim`` [N, M] is needed by the last three.
    """
    allowed = torch.ones(n, m, dtype=torch.bool, device=device)
    columns = torch.arange(m, device=device)
    if pos is not None:
        allowed &= columns[None, :] != pos[:, None]
    if q_group is not None and k_group is not None:
        allowed &= k_group[None, :] != q_group[:, None]
    if exclude_self:
        allowed &= columns[None, :] != torch.arange(n, device=device)[:, None]
    if sim is not None:
        allowed &= ~sim.isnan()
        if max_sim is not None:
            allowed &= ~(sim > torch.tensor(max_sim, dtype=sim.dtype, device=device))
        if margin is not None and pos is not None and m > 0:
            pos_sim = sim.gather(1, pos.clamp_min(0)[:, None])  # [N, 1]
            bound = pos_sim - torch.tensor(margin, dtype=sim.dtype, device=device)
            allowed &= ~((sim > bound) & (pos >= 0)[:, None])
    return allowed


def topk_hard_negatives(
    q: torch.Tensor,
    k: torch.Tensor,
    num: int,
    *,
    pos: torch.Tensor | None = None,
    q_group: torch.Tensor | None = None,
    k_group: torch.Tensor | None = None,
    exclude_self: bool = False,
    max_sim: float | None = None,
    margin: float | None = None,
    skip: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`mgccl_ops.topk_hard_negatives`.

    q [N, D], k [M, D] -> idx [N, num] int64, sim [N, num] float32: per row the allowed keys
    (:func:`allowed_keys`) ordered by ``<q_i, k_j>`` descending, ties to the smaller index, the
    first ``skip`` dropped and the next ``num`` returned; ``-1`` / ``-inf`` where fewer remain.
    """
    acc = accumulation_dtype(q.dtype)
    n, m = q.shape[0], k.shape[0]
    with torch.no_grad():
        sim = q.to(acc) @ k.to(acc).T  # [N, M]
        allowed = allowed_keys(n, m, q.device, pos, q_group, k_group, exclude_self, sim, max_sim, margin)
        # Allowed keys first (in similarity order, -inf included), then the excluded ones: a
        # stable sort on the rank keeps equal similarities in ascending key order.
        order = torch.sort(sim.nan_to_num(nan=0.0), dim=1, descending=True, stable=True).indices
        order = order.gather(1, torch.sort((~allowed.gather(1, order)).to(torch.int8), dim=1, stable=True).indices)
        order = order[:, skip : skip + num]
        top_allowed = allowed.gather(1, order)
        idx = torch.where(top_allowed, order, torch.full_like(order, -1))
        top_sim = torch.where(top_allowed, sim.gather(1, order), float("-inf"))
        if order.shape[1] < num:  # fewer than skip + num keys in all
            idx = torch.cat([idx, idx.new_full((n, num - order.shape[1]), -1)], dim=1)
            top_sim = torch.cat([top_sim, top_sim.new_full((n, num - order.shape[1]), float("-inf"))], dim=1)
    return idx, top_sim.to(torch.float32)


def hard_negative_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    pos: torch.Tensor,
    neg_idx: torch.Tensor,
    scale: float | torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Reference of :func:`mgccl_ops.hard_negative_loss`.

    q [N, D], k [M, D], pos [N] (-1 ignores the row), neg_idx [N, K] (-1 pads) -> the loss.
    Row i's softmax runs over its positive logit and one logit per listed negative (a key
    listed twice counts twice); reduced like :func:`contrastive_loss`.
    """
    check_finite_scale("hard_negative_loss", scale)
    acc = accumulation_dtype(q.dtype)
    valid = pos >= 0
    w = row_weights(weight, pos, acc)
    qa, ka = q.to(acc), k.to(acc)
    if k.shape[0] == 0:
        zero = qa.sum(1) * 0 + (scale * 0 if isinstance(scale, torch.Tensor) else 0)
        return reduce_rows(zero, w, reduction)
    pos_logit = scale * (qa * ka[pos.clamp_min(0)]).sum(1)  # [N]
    neg_logit = scale * torch.einsum("nd,nkd->nk", qa, ka[neg_idx.clamp_min(0)])  # [N, K]
    neg_logit = neg_logit.masked_fill(neg_idx < 0, float("-inf"))
    row_lse = torch.logsumexp(torch.cat([pos_logit[:, None], neg_logit], dim=1), dim=1)
    row_loss = torch.where(valid, row_lse - pos_logit, torch.zeros_like(pos_logit))
    per_row = row_loss * w if weight is not None else row_loss
    return reduce_rows(per_row, w, reduction)
