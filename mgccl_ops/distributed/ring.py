"""Ring mode of the cross-rank contrastive loss as an autograd Function.

Only key blocks travel. At step t rank r holds the keys of rank ``r - t`` (sent on to the
next rank while it computes) and computes their block of logits against its own queries
once (:mod:`mgccl_ops.distributed.block_logits`): the block's row log-sum-exps complete the
queries' own, and, for the symmetric loss, its column log-sum-exps are merged into an
accumulator that follows the key block one hop behind and arrives home after a full turn, with
the key side's global log-sum-exps. Every logit of the global batch is computed once per pass
(gather mode computes each twice, once on each side), and a rank holds its own shard, the key
block it computes on and the one arriving: O(N_local * D) memory whatever the world size.

Backward: the key blocks travel again, each with its global column log-sum-exps; a block
yields its share of the local queries' gradient and the gradient of its keys, which joins an
accumulator that travels one hop behind its block and arrives home after a full turn.
Exchanges are posted before a step's compute and waited after it. The positive logits
``scale <q_i, k_i>`` are handled directly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from mgccl_ops.distributed.block_logits import block_gradients, block_log_sum_exps
from mgccl_ops.distributed.comm import Ring
from mgccl_ops.ops._dtypes import accumulation_dtype


def _exchange(ring: Ring, sends: list[torch.Tensor], recvs: list[torch.Tensor]) -> list:
    """Posts sends to the next rank and receives from the previous one; returns the requests."""
    ops = [dist.P2POp(dist.isend, t.contiguous(), ring.next, ring.group) for t in sends]
    ops += [dist.P2POp(dist.irecv, t, ring.prev, ring.group) for t in recvs]
    return dist.batch_isend_irecv(ops) if ops else []


def _wait(requests: list) -> None:
    for request in requests:
        request.wait()


def _send_home(ring: Ring, travelling: torch.Tensor, home_rows: int) -> torch.Tensor:
    """After a full turn the accumulator held here belongs to the next rank: one last hop."""
    if ring.world == 1:
        return travelling
    home = travelling.new_empty((home_rows, *travelling.shape[1:]))
    _wait(_exchange(ring, [travelling], [home]))
    return home


class RingContrastive(torch.autograd.Function):
    """Sum over the local rows of the (symmetric) contrastive row losses against the global
    batch; the gradient of every rank's sum reaches every rank's shard (as gather mode's).

    ``forward(q [n, D], k [n, D], scale 0-dim, ring, sizes [W], symmetric) -> 0-dim``: with
    symmetric, ``sum_i (lse_i(q_i vs all k) + lse_i(k_i vs all q)) / 2 - s_ii``; otherwise
    ``sum_i lse_i(q_i vs all k) - s_ii``, where ``s_ii = scale <q_i, k_i>``.
    """

    @staticmethod
    def forward(ctx, q, k, scale, ring: Ring, sizes: list[int], symmetric: bool):
        acc = accumulation_dtype(q.dtype)
        n, d = q.shape
        lse_q = q.new_full((n,), float("-inf"), dtype=acc)
        block, src, outgoing = k, ring.rank, []
        for step in range(ring.world):
            nxt = (src - 1) % ring.world
            incoming = [q.new_empty((sizes[nxt], d))] if step < ring.world - 1 else []
            # The column accumulator of the block held at the last step arrives as this one's.
            arriving = [q.new_empty((sizes[src],), dtype=acc)] if symmetric and step else []
            requests = _exchange(ring, ([block] if incoming else []) + outgoing, incoming + arriving)
            rows, columns = block_log_sum_exps(q, block, scale, symmetric)
            lse_q = torch.logaddexp(lse_q, rows)
            _wait(requests)
            if symmetric:
                outgoing = [torch.logaddexp(arriving[0], columns) if arriving else columns]
            block, src = (incoming[0] if incoming else None), nxt
        lse_k = _send_home(ring, outgoing[0], n) if symmetric else lse_q.new_empty((0,))
        positive = scale.detach().to(acc) * (q.to(acc) * k.to(acc)).sum(1)
        row_loss = (0.5 * (lse_q + lse_k) if symmetric else lse_q) - positive
        ctx.save_for_backward(q, k, scale, lse_q, lse_k)
        ctx.ring, ctx.sizes, ctx.symmetric = ring, sizes, symmetric
        return row_loss.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, scale, lse_q, lse_k = ctx.saved_tensors
        ring, sizes, symmetric = ctx.ring, ctx.sizes, ctx.symmetric
        acc = accumulation_dtype(q.dtype)
        n, d = q.shape
        g = grad_out.detach().to(acc)
        row_coef = g * 0.5 if symmetric else g
        col_coef = g * 0.5 if symmetric else None
        to_q = q.new_zeros((n, d), dtype=acc)
        to_scale = q.new_zeros((), dtype=acc)
        # The travelling key block, with its global column log-sum-exps (symmetric loss).
        block = [k, lse_k] if symmetric else [k]
        src, outgoing = ring.rank, []
        for step in range(ring.world):
            nxt = (src - 1) % ring.world
            incoming = []
            if step < ring.world - 1:
                incoming = [q.new_empty((sizes[nxt], d))]
                incoming += [q.new_empty((sizes[nxt],), dtype=acc)] if symmetric else []
            arriving = [q.new_empty((sizes[src], d), dtype=acc)] if step else []
            requests = _exchange(ring, (block if incoming else []) + outgoing, incoming + arriving)
            col_lse = block[1] if symmetric else None
            part_q, part_k, part_scale = block_gradients(q, block[0], scale, lse_q, row_coef, col_lse, col_coef)
            to_q += part_q
            to_scale += part_scale
            _wait(requests)
            outgoing = [arriving[0].add_(part_k) if arriving else part_k]
            block, src = incoming, nxt
        to_k = _send_home(ring, outgoing[0], n)
        s = scale.detach().to(acc)
        qa, ka = q.to(acc), k.to(acc)
        grad_q = (s * (to_q - g * ka)).to(q.dtype)
        grad_k = (s * (to_k - g * qa)).to(k.dtype)
        grad_scale = (to_scale - g * (qa * ka).sum()).to(scale.dtype) if ctx.needs_input_grad[2] else None
        return grad_q, grad_k, grad_scale, None, None, None
