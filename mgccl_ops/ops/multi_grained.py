"""Multi-grained loss (DESIGN.md op 4): several levels of queries against one key bank.

All levels are concatenated into one call over the key bank. Row i of level l carries the
weight ``weight_l / n_valid_l`` (``n_valid_l``: the rows of level l with a positive), so the
"sum" reduction of one fused op is ``sum_l weight_l * mean_loss_l``: one pass over the keys
(``torch.ops.mgccl.contrastive_loss``). With ``hard_negatives=K`` the rows of all levels are
mined in one ``torch.ops.mgccl.topk_hard_negatives`` call (no gradient), each row carrying its
level's group, or a group no key has for levels without groups (:func:`row_groups`), then one
``torch.ops.mgccl.hard_negative_loss`` call covers the rows of all levels. The per-level means
come from the per-row log-sum-exps or losses that the fused op returns, without another pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from mgccl_ops.ops import _checks, autocast
from mgccl_ops.ops._dtypes import accumulation_dtype
from mgccl_ops.ops.hard_negatives import (
    hard_negative_loss_with_rows,
    topk_hard_negatives,
)

OP = "multi_grained_loss"


class Level(NamedTuple):
    q: torch.Tensor  # [N_l, D]
    pos: torch.Tensor  # [N_l] int64
    weight: float
    q_group: torch.Tensor | None  # [N_l] int64


def parse_levels(levels: Sequence[tuple], k: torch.Tensor, k_group: torch.Tensor | None) -> list[Level]:
    """Checks every level tuple against the key bank and returns them as :class:`Level`."""
    _checks.check_dim(OP, "k", k, 2, "[M, D]")
    _checks.check_float(OP, "k", k)
    if k_group is not None:
        _checks.check_index(OP, "k_group", k_group, k.shape[0], "M")
        _checks.check_same_device(OP, "k_group", k_group, "k", k)
    if isinstance(levels, torch.Tensor) or not isinstance(levels, Sequence) or len(levels) == 0:
        raise ValueError(f"{OP}: levels should be a non-empty sequence of tuples, got {levels!r:.80}")
    parsed = []
    for index, level in enumerate(levels):
        name = f"levels[{index}]"
        if not isinstance(level, (tuple, list)) or len(level) not in (3, 4):
            got = (
                f"a {type(level).__name__} of length {len(level)}" if isinstance(level, (tuple, list)) else repr(level)
            )
            raise ValueError(f"{OP}: {name} should be (q, pos, weight) or (q, pos, weight, q_group), got {got:.80}")
        q, pos, weight = level[:3]
        q_group = level[3] if len(level) == 4 else None
        _checks.check_dim(OP, f"{name} q", q, 2, "[N_l, D]")
        _checks.check_same_dtype(OP, f"{name} q", q, "k", k)
        _checks.check_size(OP, f"{name} q", q, 1, k.shape[1], "k.shape[1] (D)")
        _checks.check_same_device(OP, f"{name} q", q, "k", k)
        _checks.check_index(OP, f"{name} pos", pos, q.shape[0], "N_l")
        _checks.check_same_device(OP, f"{name} pos", pos, f"{name} q", q)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"{OP}: {name} weight should be a float, got {type(weight).__name__}")
        if q_group is not None:
            _checks.check_index(OP, f"{name} q_group", q_group, q.shape[0], "N_l")
            _checks.check_same_device(OP, f"{name} q_group", q_group, f"{name} q", q)
            if k_group is None:
                raise ValueError(f"{OP}: {name} has a q_group but k_group is None")
        parsed.append(Level(q, pos, float(weight), q_group))
    return parsed


def check_hard_negatives(hard_negatives: int | None) -> None:
    """``hard_negatives`` is None or an int >= 0 (ValueError naming the value otherwise)."""
    if hard_negatives is not None and (
        isinstance(hard_negatives, bool) or not isinstance(hard_negatives, int) or hard_negatives < 0
    ):
        raise ValueError(f"{OP}: hard_negatives should be None or an int >= 0, got {hard_negatives!r}")


def level_sums(values: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Sums the rows of each level: values [N] in level order, sizes [L] -> [L]."""
    return torch.stack([part.sum() for part in values.split(sizes)])


def row_groups(levels: list[Level], k_group: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Groups for mining the rows of all levels at once: (q_group [sum N_l], k_group [M]) or
    (None, None) when no level has groups.

    A level without ``q_group`` excludes no key by group. When levels with and without groups
    are mixed, the groups are renumbered (each key group by the position of its first occurrence
    in the sorted ``k_group``, a row group likewise or -1 if no key has it) so that -1 names a
    group no key has; this needs no value read back from the device.
    """
    if all(level.q_group is None for level in levels):
        return None, None
    if all(level.q_group is not None for level in levels):
        return torch.cat([level.q_group for level in levels]), k_group
    m = k_group.shape[0]
    sorted_groups = torch.sort(k_group).values
    key_ids = torch.searchsorted(sorted_groups, k_group)
    parts = []
    for level in levels:
        if level.q_group is None or m == 0:
            parts.append(torch.full_like(level.pos, -1))
            continue
        slot = torch.searchsorted(sorted_groups, level.q_group).clamp_max(m - 1)
        parts.append(torch.where(sorted_groups[slot] == level.q_group, slot, -1))
    return torch.cat(parts), key_ids


def positive_dot_sums(levels: list[Level], k: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """[L]: per level, the sum over rows with a positive of ``<q_i, k_pos[i]>``.

    ``sum_i <q_i, k_pos[i]> = sum_j <k_j, sum_{i: pos[i] = j} q_i>``: the queries are summed per
    (level, positive key) into an [L * M + 1, D] table (the last row collects ignored rows), so
    no [N, D] gather of keys is built.
    """
    m, d = k.shape
    table = k.new_zeros((len(levels) * m + 1, d), dtype=acc)
    for index, level in enumerate(levels):
        slot = torch.where(level.pos >= 0, level.pos + index * m, len(levels) * m)
        table.index_add_(0, slot, level.q.detach().to(acc))
    per_key = table[: len(levels) * m].view(len(levels), m, d)
    return (per_key * k.detach().to(acc)).sum((1, 2))


def multi_grained_loss(
    levels: Sequence[tuple],
    k: torch.Tensor,
    scale: float | torch.Tensor,
    *,
    k_group: torch.Tensor | None = None,
    hard_negatives: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of per-level contrastive losses against one shared key bank, in one pass.

    Autocast (CPU, CUDA): every ``q_l`` and ``k`` are cast to the autocast dtype first; see
    docs/ops.md.

    Args:
        levels: a sequence of ``(q_l [N_l, D], pos_l [N_l] int64, weight_l)`` or
            ``(q_l, pos_l, weight_l, q_group_l [N_l] int64)``; ``pos_l = -1`` ignores a row,
            ``weight_l`` is a Python float. A level without rows that have a positive
            contributes nothing, whatever its weight (inf and NaN included).
        k: [M, D] keys, same dtype and device as every ``q_l``.
        scale: a float or a 0-dim tensor (logits are ``scale * <q, k>``).
        k_group: optional [M] int64 group of each key. Groups only steer the mining: with
            ``hard_negatives`` a key of a row's own group is never its negative.
        hard_negatives: None for the full softmax over ``k``; K to mine ``min(K, M)``
            negatives per row (:func:`topk_hard_negatives`, excluding the positive and
            same-group keys) and use :func:`hard_negative_loss`.

    Returns:
        ``total = sum_l weight_l * mean_loss_l`` (0-dim) and ``per_level`` [L], each level's
        mean loss over its rows with a positive (0 when none), detached; float32 (float64 for
        float64 inputs). Gradients reach every ``q_l``, ``k`` and a tensor ``scale``; not
        second-order ones (``create_graph=True`` raises). Errors name the level at fault.
    """
    parsed = parse_levels(levels, k, k_group)
    # Under autocast the ops' rule (q and k in the autocast dtype), applied here already so that
    # the per-level sums below see the values the kernels see.
    k, *level_qs = autocast.cast_for_autocast(k, *(level.q for level in parsed))
    parsed = [level._replace(q=q_level) for level, q_level in zip(parsed, level_qs)]
    check_hard_negatives(hard_negatives)
    scale_t = _checks.scale_tensor(OP, scale, k)
    _checks.check_same_device(OP, "scale", scale_t, "k", k)
    if torch.compiler.is_compiling():
        return _fused_levels(parsed, k, scale_t, k_group, hard_negatives)
    try:
        return _fused_levels(parsed, k, scale_t, k_group, hard_negatives)
    except RuntimeError as error:
        raise _level_error(parsed, k, error) from error


def _level_error(levels: list[Level], k: torch.Tensor, error: RuntimeError) -> Exception:
    """The error of a failed fused call, naming the level at fault where one is (a positive out
    of range) and this op in any case. Runs only after a failure, so it may read values."""
    m = k.shape[0]
    for index, level in enumerate(levels):
        if level.pos.numel() > 0 and level.pos.device.type != "meta":
            low, high = int(level.pos.min()), int(level.pos.max())
            if low < -1 or high >= m:
                return ValueError(
                    f"{OP}: levels[{index}] pos values should lie in [-1, M = {m}), got min {low} and max {high}"
                )
    return RuntimeError(f"{OP}: {error}")


def _fused_levels(
    parsed: list[Level],
    k: torch.Tensor,
    scale_t: torch.Tensor,
    k_group: torch.Tensor | None,
    hard_negatives: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused computation of :func:`multi_grained_loss` on checked levels."""
    acc = accumulation_dtype(k.dtype)
    sizes = [level.q.shape[0] for level in parsed]
    q = parsed[0].q if len(parsed) == 1 else torch.cat([level.q for level in parsed])
    pos = parsed[0].pos if len(parsed) == 1 else torch.cat([level.pos for level in parsed])
    valid = pos >= 0
    n_valid = level_sums(valid.to(acc), sizes)
    # weight_l / n_valid_l on the rows with a positive, exactly 0 on the others (whatever
    # weight_l is: an infinite level weight must not turn an ignored row into 0 * inf = NaN).
    row_weight = torch.cat(
        [
            torch.where(part, level.weight / count.clamp_min(1), torch.zeros((), dtype=acc, device=part.device))
            for part, level, count in zip(valid.split(sizes), parsed, n_valid)
        ]
    )

    if hard_negatives is None:
        grad_enabled = torch.is_grad_enabled()
        grad_mask = [grad_enabled and t.requires_grad for t in (q, k, scale_t)]
        total, row_lse, *_ = torch.ops.mgccl.contrastive_loss.default(
            q, k, pos, scale_t, row_weight, "sum", False, grad_mask
        )
        lse_sums = level_sums(row_lse.detach() * valid, sizes)
        loss_sums = lse_sums - scale_t.detach().to(acc) * positive_dot_sums(parsed, k, acc)
    else:
        q_group, k_group_ids = row_groups(parsed, k_group)
        num = min(hard_negatives, k.shape[0])
        neg_idx, _ = topk_hard_negatives(q, k, num, pos=pos, q_group=q_group, k_group=k_group_ids)
        total, row_loss = hard_negative_loss_with_rows(q, k, pos, neg_idx, scale_t, weight=row_weight, reduction="sum")
        loss_sums = level_sums(row_loss, sizes)
    per_level = torch.where(n_valid > 0, loss_sums / n_valid.clamp_min(1), torch.zeros_like(loss_sums))
    return total, per_level.detach()
