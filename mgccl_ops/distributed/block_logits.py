"""One block of the cross-rank logits ``S = scale * q k^T`` [n, m] in row tiles of bounded size.

The ring (:mod:`mgccl_ops.distributed.ring`) meets every (query shard, key shard) pair once; one
block then yields everything both sides of the symmetric loss need: the row log-sum-exps of the
queries, a partial column log-sum-exp of the keys, and, given the global log-sum-exps, the
gradients it passes to both shards. Two tiles of ``rows x m`` logits are the most held at once
(:func:`tile_bytes`).
"""

from __future__ import annotations

import torch

from mgccl_ops.ops._dtypes import accumulation_dtype

MIN_TILE_ROWS = 128  # fewer rows per tile would reread the key block for too little work


def tile_bytes(device: torch.device) -> int:
    """Bytes of one logits tile: 8 MiB on the CPU (cache-sized), 256 MiB on a GPU; a tile
    holds at least :data:`MIN_TILE_ROWS` rows, so a block of m > 16384 keys (CPU, float32)
    has tiles of ``128 x m``."""
    return (8 << 20) if device.type == "cpu" else (256 << 20)


def _tiles(q: torch.Tensor, m: int, acc: torch.dtype):
    """(start, rows [r, D] in ``acc``) of ``q``, r rows per tile so that r x m fits a tile."""
    step = max(MIN_TILE_ROWS, tile_bytes(q.device) // (max(m, 1) * acc.itemsize))
    for start in range(0, q.shape[0], step):
        yield start, q[start : start + step].to(acc)


def block_log_sum_exps(
    q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, want_columns: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row and column log-sum-exps of ``S = scale * q k^T``, in the accumulation dtype.

    Args:
        q: [n, D] queries; k: [m, D] keys (same dtype); scale: 0-dim.
        want_columns: also the column log-sum-exps.

    Returns:
        ``(rows [n], columns [m] or None)``; -inf where the other side is empty.
    """
    acc = accumulation_dtype(q.dtype)
    n, m = q.shape[0], k.shape[0]
    keys_t, s = k.to(acc).t(), scale.detach().to(acc)
    rows = q.new_full((n,), float("-inf"), dtype=acc)
    columns = q.new_full((m,), float("-inf"), dtype=acc) if want_columns else None
    if n == 0 or m == 0:
        return rows, columns
    for start, tile_q in _tiles(q, m, acc):
        logits = torch.mm(tile_q, keys_t).mul_(s)  # [r, m]
        rows[start : start + tile_q.shape[0]] = torch.logsumexp(logits, 1)
        if want_columns:
            columns = torch.logaddexp(columns, torch.logsumexp(logits, 0))
    return rows, columns


def block_gradients(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    row_lse: torch.Tensor,
    row_coef: torch.Tensor,
    col_lse: torch.Tensor | None,
    col_coef: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block's gradients, without the factor ``scale`` on q and k.

    With ``G = row_coef * softmax_rows(S) + col_coef * softmax_cols(S)``, the softmaxes taken
    with the global log-sum-exps (``exp(S_ij - row_lse_i)`` and ``exp(S_ij - col_lse_j)``), the
    loss's gradients are ``scale * G k``, ``scale * G^T q`` and ``sum_ij G_ij <q_i, k_j>``.

    Args:
        q: [n, D]; k: [m, D]; scale: 0-dim.
        row_lse: [n] and row_coef (0-dim): the query side.
        col_lse: [m] and col_coef (0-dim), or None for a loss without the key side.

    Returns:
        ``(G k [n, D], G^T q [m, D], sum_ij G_ij <q_i, k_j>)`` in the accumulation dtype.
    """
    acc = accumulation_dtype(q.dtype)
    n, m = q.shape[0], k.shape[0]
    keys, s = k.to(acc), scale.detach().to(acc)
    to_q = q.new_zeros((n, q.shape[1]), dtype=acc)
    to_k = q.new_zeros((m, q.shape[1]), dtype=acc)
    to_scale = q.new_zeros((), dtype=acc)
    if n == 0 or m == 0:
        return to_q, to_k, to_scale
    for start, tile_q in _tiles(q, m, acc):
        stop = start + tile_q.shape[0]
        logits = torch.mm(tile_q, keys.t()).mul_(s)  # [r, m]
        grad = (logits - row_lse[start:stop, None]).exp_().mul_(row_coef)
        if col_lse is not None:
            grad.add_(logits.sub_(col_lse[None, :]).exp_().mul_(col_coef))
        del logits
        tile_to_q = torch.mm(grad, keys)
        to_q[start:stop] = tile_to_q
        to_scale += (tile_to_q * tile_q).sum()
        to_k.addmm_(grad.t(), tile_q)
    return to_q, to_k, to_scale
