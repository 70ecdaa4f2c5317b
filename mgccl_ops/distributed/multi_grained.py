"""Cross-rank multi-grained loss: the key bank gathered, hard negatives mined over it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

import mgccl_ops
from mgccl_ops.distributed.comm import (
    agree,
    all_gather_rows,
    all_reduce_sum,
    gather_rows_with_grad,
    ring_of,
)
from mgccl_ops.ops import _checks
from mgccl_ops.ops._dtypes import accumulation_dtype
from mgccl_ops.ops.multi_grained import check_hard_negatives, parse_levels

OP = "multi_grained_loss"


def multi_grained_loss(
    levels: Sequence[tuple],
    k: torch.Tensor,
    scale: float | torch.Tensor,
    *,
    k_group: torch.Tensor | None = None,
    hard_negatives: int | None = None,
    shared_keys: int = 0,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mgccl_ops.multi_grained_loss` over the levels and key banks of all ranks.

    Each rank passes its own levels ``(q_l [N_l, D], pos_l [N_l], weight_l[, q_group_l])``
    whose ``pos_l`` index its own bank ``k`` [M_r, D]. The banks are gathered (with gradient)
    in rank order; every row sees the global bank, and ``hard_negatives`` mines over it with
    the global ``k_group`` (group ids must mean the same on every rank, e.g. one id per phrase
    text). The result equals the single-process call on the concatenated levels (positives
    shifted by the bank offsets) and bank, on every rank; under DDP the parameter gradients
    equal the single-process ones. Level weights and the number of levels must agree across
    ranks.

    ``shared_keys = S`` says that the last S rows of every rank's bank (and of ``k_group``)
    are the same keys on every rank, such as a learned background embedding: they enter the
    global bank once, after the gathered rows, and a positive pointing at one of them points
    at that single copy. The single-process equivalent is the concatenation of the ranks'
    first ``M_r - S`` rows followed by the S shared rows.

    Returns:
        ``(total, per_level)``: ``sum_l weight_l * mean_loss_l`` with the means over the
        global rows with a positive, and ``per_level`` [L] (detached).

    Raises:
        ValueError: bad levels, bank, scale or hard_negatives (as the single-process op);
            ``shared_keys`` not in ``0..M_r`` or different between ranks. A bad input on one
            rank raises on every rank (naming it), never leaves them waiting.
    """
    ring = ring_of(OP, group)

    def local_checks() -> tuple[list, list[int]]:
        parsed = parse_levels(levels, k, k_group)
        check_hard_negatives(hard_negatives)
        _checks.scale_tensor(OP, scale, k)
        if isinstance(shared_keys, bool) or not isinstance(shared_keys, int) or not 0 <= shared_keys <= k.shape[0]:
            raise ValueError(f"{OP}: shared_keys should be an int in [0, M = {k.shape[0]}], got {shared_keys!r}")
        return parsed, [k.shape[0] - shared_keys, shared_keys]

    # Every rank's (own keys, shared keys), gathered with the checks' outcome.
    parsed, counts = agree(ring, OP, local_checks, width=2)
    acc = accumulation_dtype(k.dtype)
    own = k.shape[0] - shared_keys
    if len({s for _, s in counts}) > 1:
        raise ValueError(f"{OP}: shared_keys should be the same on every rank, got {[s for _, s in counts]}")
    banks = [m for m, _ in counts]
    offset, gathered = sum(banks[: ring.rank]), sum(banks)
    all_k = torch.cat([gather_rows_with_grad(ring, k[:own], banks), k[own:]])
    all_group = None
    if k_group is not None:
        all_group = torch.cat([all_gather_rows(ring, k_group[:own], banks), k_group[own:]])
    local_valid = torch.stack([(level.pos >= 0).sum() for level in parsed]).to(acc)
    valid = all_reduce_sum(ring, local_valid)
    local_counts, global_counts = local_valid.tolist(), valid.tolist()
    shifted = []
    for level, mine, everyone in zip(parsed, local_counts, global_counts):
        to_shared = gathered - own  # a shared row's local index plus this is its global index
        pos = torch.where(level.pos >= own, level.pos + to_shared, level.pos + offset)
        pos = torch.where(level.pos >= 0, pos, level.pos)
        weight = level.weight * mine / everyone if everyone else 0.0
        shifted.append((level.q, pos, weight) + (() if level.q_group is None else (level.q_group,)))
    local_total, local_means = mgccl_ops.multi_grained_loss(
        shifted, all_k, scale, k_group=all_group, hard_negatives=hard_negatives
    )
    sums = all_reduce_sum(ring, local_means * local_valid)
    per_level = torch.where(valid > 0, sums / valid.clamp_min(1), torch.zeros_like(sums))
    total = all_reduce_sum(ring, local_total)
    local = local_total * ring.world
    return local + (total - local).detach(), per_level
