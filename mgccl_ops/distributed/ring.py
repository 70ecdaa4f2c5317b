"""Ring mode of the cross-rank contrastive loss (Inf-CL's scheme) as an autograd Function.

Forward: the ranks' (q, k) shards travel around the ring (``batch_isend_irecv`` to the next
rank, from the previous one). While the next block is in flight, the fused op computes the
per-row log-sum-exp of the local rows against the block held now, merged into running
log-sum-exps. A rank holds its own shard, the block it computes on and the one arriving: never
more than two remote blocks, so memory is O(N_local * D) whatever the world size.

Backward: the blocks travel around again; the fused backward op, given the global
log-sum-exps, yields each block's share of the local rows' gradient and the gradient of the
block's own rows, which is added to an accumulator that travels one hop behind its block and
arrives home after a full turn. Every exchange is posted before the step's compute and waited
after it.

Non-home blocks have no positive for the local rows. The fused backward op drops rows whose
``pos`` is -1, so each block travels with one extra zero row and ``pos`` points there: the
zero key adds nothing to any gradient and its own (discarded) gradient absorbs the positive
term. The positive logits ``scale <q_i, k_i>`` are handled directly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from mgccl_ops.distributed.comm import Ring
from mgccl_ops.ops._dtypes import accumulation_dtype


def _exchange(ring: Ring, sends: list[torch.Tensor], recvs: list[torch.Tensor]) -> list:
    """Posts sends to the next rank and receives from the previous one; returns the requests."""
    ops = [dist.P2POp(dist.isend, t, ring.next, ring.group) for t in sends]
    ops += [dist.P2POp(dist.irecv, t, ring.prev, ring.group) for t in recvs]
    return dist.batch_isend_irecv(ops) if ops else []


def _wait(requests: list) -> None:
    for request in requests:
        request.wait()


def _block_lse(rows: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[n]: log-sum-exp over the keys of ``scale * <rows_i, keys_j>`` (fused op, no gradient)."""
    no_pos = torch.full((rows.shape[0],), -1, dtype=torch.int64, device=rows.device)
    return torch.ops.mgccl.contrastive_loss.default(rows, keys, no_pos, scale, None, "sum", False, [False] * 3)[1]


def _with_zero_row(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros((1, x.shape[1]))])


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
        n = q.shape[0]
        lse_q = q.new_full((n,), float("-inf"), dtype=acc)
        lse_k = q.new_full((n if symmetric else 0,), float("-inf"), dtype=acc)
        blocks, src = ([q, k] if symmetric else [k]), ring.rank
        for step in range(ring.world):
            nxt = (src - 1) % ring.world
            incoming, requests = [], []
            if step < ring.world - 1:
                incoming = [q.new_empty((sizes[nxt], q.shape[1])) for _ in blocks]
                requests = _exchange(ring, [b.contiguous() for b in blocks], incoming)
            if n and sizes[src]:
                lse_q = torch.logaddexp(lse_q, _block_lse(q, blocks[-1], scale))
                if symmetric:
                    lse_k = torch.logaddexp(lse_k, _block_lse(k, blocks[0], scale))
            _wait(requests)
            blocks, src = incoming, nxt
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
        want_scale = ctx.needs_input_grad[2]
        g = grad_out.detach().to(acc)
        row_grad = (g * (0.5 if symmetric else 1.0)).expand(n).contiguous()
        no_lse = lse_q.new_empty((0,))
        local_q = q.new_zeros((n, d), dtype=acc)
        local_k = q.new_zeros((n, d), dtype=acc)
        grad_scale = q.new_zeros((), dtype=acc)
        # (local rows, their log-sum-exps, their gradient, index of the travelling block).
        pairs = [(q, lse_q, local_q, -1)] + ([(k, lse_k, local_k, 0)] if symmetric else [])

        def contributions(blocks: list[torch.Tensor], src: int) -> list[torch.Tensor]:
            nonlocal grad_scale
            if not (n and sizes[src]):
                return [q.new_zeros((sizes[src], d), dtype=acc) for _ in blocks]
            out = [None] * len(blocks)
            pos = torch.full((n,), sizes[src], dtype=torch.int64, device=q.device)
            for rows, lse, local, index in pairs:
                grad_rows, grad_block, grad_s = torch.ops.mgccl.contrastive_loss_backward.default(
                    row_grad, rows, blocks[index], pos, scale, lse, no_lse, False, [True, True, want_scale]
                )
                local += grad_rows
                out[index] = grad_block[: sizes[src]].to(acc)  # the zero key's row is dropped
                if want_scale:
                    grad_scale = grad_scale + grad_s.to(acc)
            return out

        blocks = [_with_zero_row(q), _with_zero_row(k)] if symmetric else [_with_zero_row(k)]
        src, outgoing = ring.rank, []
        for step in range(ring.world):
            nxt = (src - 1) % ring.world
            arriving = [q.new_empty((sizes[src], d), dtype=acc) for _ in blocks] if step else []
            incoming = [q.new_empty((sizes[nxt] + 1, d)) for _ in blocks] if step < ring.world - 1 else []
            requests = _exchange(ring, outgoing + (blocks if incoming else []), arriving + incoming)
            added = contributions(blocks, src)
            _wait(requests)
            outgoing = [a.add_(c) for a, c in zip(arriving, added)] if step else added
            blocks, src = incoming, nxt
        home = outgoing
        if ring.world > 1:
            home = [q.new_empty((n, d), dtype=acc) for _ in outgoing]
            _wait(_exchange(ring, outgoing, home))
        if symmetric:
            local_q += home[0]
        local_k += home[-1]
        scale_acc = scale.detach().to(acc)
        grad_q = (local_q - g * scale_acc * k.to(acc)).to(q.dtype)
        grad_k = (local_k - g * scale_acc * q.to(acc)).to(k.dtype)
        if want_scale:
            grad_scale = (grad_scale - g * (q.to(acc) * k.to(acc)).sum()).to(scale.dtype)
        return grad_q, grad_k, grad_scale if want_scale else None, None, None, None
