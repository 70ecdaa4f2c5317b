"""Cross-rank CLIP loss (DESIGN.md section 6): gather and ring modes behind one function."""

from __future__ import annotations

import torch
import torch.distributed as dist

import mgccl_ops
from mgccl_ops.distributed.comm import Ring, agree, all_reduce_sum, gather_rows_with_grad, ring_of
from mgccl_ops.distributed.ring import RingContrastive
from mgccl_ops.ops import _checks
from mgccl_ops.ops._dtypes import accumulation_dtype

OP = "contrastive_loss"
MODES = ("gather", "ring")


def global_mean(ring: Ring, local_sum: torch.Tensor, count: int) -> torch.Tensor:
    """The global mean ``sum_r local_sum_r / count``, the same value on every rank.

    Its gradient is ``world / count`` times that of this rank's ``local_sum``: DDP averages the
    parameter gradients of the ranks, and each rank's ``local_sum`` already carries the
    gradient of every rank's sum into its own shard (gather with gradient, or the ring), so the
    average is the gradient of the global mean, as single-process training computes it.
    """
    total = all_reduce_sum(ring, local_sum)
    if count == 0:
        return local_sum * 0.0
    local = local_sum * (ring.world / count)
    return local + (total / count - local).detach()


def check_local_shards(q: torch.Tensor, k: torch.Tensor) -> None:
    """This rank's q and k: [N, D] each, one floating dtype, one device."""
    _checks.check_dim(OP, "q", q, 2, "[N, D]")
    _checks.check_dim(OP, "k", k, 2, "[N, D]")
    _checks.check_float(OP, "q", q)
    _checks.check_same_dtype(OP, "k", k, "q", q)
    _checks.check_same_device(OP, "k", k, "q", q)
    if q.shape != k.shape:
        raise ValueError(f"{OP}: q and k should have the same shape [N, D], got {tuple(q.shape)} and {tuple(k.shape)}")


def shard_sizes(shapes: list[list[int]]) -> list[int]:
    """Every rank's N from every rank's [N, D] (raising on every rank where D differs)."""
    widths = {d for _, d in shapes}
    if len(widths) > 1:
        raise ValueError(f"{OP}: every rank should pass the same D, got [N, D] per rank {shapes}")
    return [n for n, _ in shapes]


def contrastive_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float | torch.Tensor,
    *,
    mode: str = "gather",
    symmetric: bool = True,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """CLIP's contrastive loss over the batch of all ranks; each rank passes its own shard.

    Row i of ``q`` is paired with row i of ``k``. Local sizes may differ between ranks. The
    result is the mean loss over the global batch (the concatenation of the shards in rank
    order), the same value on every rank, equal to ``mgccl_ops.contrastive_loss(Q, K,
    arange(N), scale, symmetric=symmetric)`` on the concatenated batch. Under DDP (which
    averages gradients over ranks) the parameter gradients equal that single-process call's.

    Args:
        q: [N_r, D] this rank's queries (e.g. image embeddings).
        k: [N_r, D] this rank's keys (e.g. text embeddings), same dtype and device.
        scale: a float or a 0-dim tensor (logits are ``scale * <q_i, k_j>``); the same on
            every rank (a replicated parameter such as ``logit_scale.exp()``).
        mode: ``"gather"``: all-gather q and k with gradient, local rows against all keys
            and local keys against all queries in the fused op (memory O(N_global * D));
            ``"ring"``: blocks travel around the ring (memory O(N_r * D)).
        symmetric: the two-sided CLIP loss; False keeps the query-to-key side only.
        group: the process group (default: the world).

    Returns:
        0-dim loss in float32 (float64 for float64 inputs).

    Raises:
        RuntimeError: torch.distributed is not initialised.
        ValueError: bad shapes, dtypes, devices or mode; D differing between ranks. A bad
            input on one rank raises on every rank (naming it), never leaves them waiting.
    """
    ring = ring_of(OP, group)

    def local_checks() -> tuple[torch.Tensor, list[int]]:
        _checks.check_choice(OP, "mode", mode, MODES)
        check_local_shards(q, k)
        scale_t = _checks.scale_tensor(OP, scale, q)
        if not bool(torch.isfinite(scale_t.detach())):  # ring mode's block math would give NaN
            raise ValueError(f"{OP}: scale should be finite, got {scale_t.item()}")
        return scale_t, list(q.shape)

    scale_t, shapes = agree(ring, OP, local_checks, width=2)
    sizes = shard_sizes(shapes)
    if mode == "ring":
        local_sum = RingContrastive.apply(q, k, scale_t, ring, sizes, symmetric)
    else:
        local_sum = _gathered_local_sum(ring, q, k, scale_t, sizes, symmetric)
    return global_mean(ring, local_sum.to(accumulation_dtype(q.dtype)), sum(sizes))


def _gathered_local_sum(
    ring: Ring, q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, sizes: list[int], symmetric: bool
) -> torch.Tensor:
    """Sum of this rank's row (and column) losses against the gathered batch (fused op)."""
    offset = sum(sizes[: ring.rank])
    pos = torch.arange(offset, offset + q.shape[0], device=q.device)
    all_k = gather_rows_with_grad(ring, k, sizes)
    rows = mgccl_ops.contrastive_loss(q, all_k, pos, scale, reduction="sum")
    if not symmetric:
        return rows
    all_q = gather_rows_with_grad(ring, q, sizes)
    return 0.5 * (rows + mgccl_ops.contrastive_loss(k, all_q, pos, scale, reduction="sum"))
