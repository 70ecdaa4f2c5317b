"""Hard-negative mining and hard-negative loss (docs/ops.md): typed wrappers, fake
impls, autograd.

``torch.ops.mgccl.topk_hard_negatives`` selects per row the most similar allowed keys without
the N x M similarity matrix; it has no gradient. ``torch.ops.mgccl.hard_negative_loss`` computes
the K+1 logits of each row by indexed dot products and, for reduction "mean"/"sum", the
gradients in the same pass, which backward only rescales; reduction "none" recomputes them in
``torch.ops.mgccl.hard_negative_loss_backward`` with the per-row incoming gradient.
"""

from __future__ import annotations

import torch

from mgccl_ops.ops import _checks, _double_backward
from mgccl_ops.ops._dtypes import accumulation_dtype

MINE_OP = "topk_hard_negatives"
LOSS_OP = "hard_negative_loss"


def check_mining_options(n, m, num, skip, exclude_self, max_sim, margin, has_pos: bool, error=ValueError) -> None:
    """The mining options of N queries and M keys: ``num`` and ``skip`` ints, 0 <= num <= M and
    skip >= 0; ``exclude_self`` only with N == M; ``max_sim`` and ``margin`` None or a number (not
    NaN); ``margin`` only with ``pos`` (``has_pos``).

    A wrong Python type raises TypeError, a wrong value ``error``: ValueError in the wrapper,
    RuntimeError in the Triton kernel (as the C++ kernels raise); the messages are the same.
    """
    for name, count in (("num", num), ("skip", skip)):
        if isinstance(count, bool) or not isinstance(count, int):
            raise TypeError(f"{MINE_OP}: {name} should be an int, got {type(count).__name__}")
    if not 0 <= num <= m:
        raise error(f"{MINE_OP}: num should lie in [0, M = {m}], got {num}")
    if skip < 0:
        raise error(f"{MINE_OP}: skip should be >= 0, got {skip}")
    if exclude_self and n != m:
        raise error(f"{MINE_OP}: exclude_self=True needs as many queries as keys, got N = {n} and M = {m}")
    for name, value in (("max_sim", max_sim), ("margin", margin)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{MINE_OP}: {name} should be a float or None, got {type(value).__name__}")
        if value != value:
            raise error(f"{MINE_OP}: {name} should be a number, got nan")
    if margin is not None and not has_pos:
        raise error(f"{MINE_OP}: margin needs pos (the similarity it is measured from), got pos=None")


def check_mining_inputs(q, k, num, pos, q_group, k_group, exclude_self, max_sim, margin, skip) -> None:
    """Metadata checks shared by the wrapper and the fake impl (values are checked in kernels)."""
    _checks.check_query_key_pair(MINE_OP, q, k)
    check_mining_options(q.shape[0], k.shape[0], num, skip, exclude_self, max_sim, margin, pos is not None)
    if pos is not None:
        _checks.check_index(MINE_OP, "pos", pos, q.shape[0], "N")
        _checks.check_same_device(MINE_OP, "pos", pos, "q", q)
    if (q_group is None) != (k_group is None):
        given = "q_group" if q_group is not None else "k_group"
        raise ValueError(f"{MINE_OP}: q_group and k_group should be given together, got only {given}")
    if q_group is not None:
        _checks.check_index(MINE_OP, "q_group", q_group, q.shape[0], "N")
        _checks.check_index(MINE_OP, "k_group", k_group, k.shape[0], "M")
        _checks.check_same_device(MINE_OP, "q_group", q_group, "q", q)
        _checks.check_same_device(MINE_OP, "k_group", k_group, "q", q)


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
    """The ``num`` most similar allowed keys of every query, without the N x M similarities.

    With ``s_ij = <q_i, k_j>`` (accumulated in float32, float64 for float64 inputs), key j is
    not allowed for row i when any of these holds (the contract in ``docs/ops.md``):

    - ``j == pos[i]`` (``pos`` given and ``pos[i] >= 0``);
    - ``k_group[j] == q_group[i]`` (both given);
    - ``exclude_self`` and ``j == i`` (queries and keys are the same set; needs N == M);
    - ``max_sim`` is given and ``s_ij > max_sim`` (near-duplicates);
    - ``margin`` is given, ``pos[i] >= 0`` and ``s_ij > s_i,pos[i] - margin`` (likely false
      negatives, as sentence-transformers' ``mine_hard_negatives`` filters them; needs ``pos``);
    - ``s_ij`` is NaN. (``-inf`` similarities are allowed and returned like any other.)

    The allowed keys are ordered by ``s_ij`` descending, ties to the smaller index; the first
    ``skip`` are dropped and the next ``num`` returned.

    Autocast (CPU, CUDA): ``q`` and ``k`` are cast to the autocast dtype (two castable dtypes
    are then accepted); the rest as given; see docs/ops.md.

    Args:
        q: [N, D] queries (float16, bfloat16, float32 or float64).
        k: [M, D] keys, same dtype and device as ``q``.
        num: how many keys per row, 0 <= num <= M.
        pos: optional [N] int64, each row's positive key (excluded), or -1.
        q_group: optional [N] int64 group of each row; needs ``k_group``.
        k_group: optional [M] int64 group of each key; needs ``q_group``.
        exclude_self: key i is never row i's negative.
        max_sim: optional upper bound on a returned similarity.
        margin: optional distance below the row's positive similarity a key must keep.
        skip: how many of the most similar allowed keys to pass over (>= 0).

    Returns:
        ``idx`` [N, num] int64 and ``sim`` [N, num] float32 (``<q_i, k_idx>``), sorted by
        similarity descending with ties to the smaller key index; ``-1`` / ``-inf`` where fewer
        than ``skip + num`` keys are allowed. No gradient flows.
    """
    check_mining_inputs(q, k, num, pos, q_group, k_group, exclude_self, max_sim, margin, skip)
    return torch.ops.mgccl.topk_hard_negatives.default(
        q.detach(),
        k.detach(),
        num,
        pos,
        q_group,
        k_group,
        bool(exclude_self),
        None if max_sim is None else float(max_sim),
        None if margin is None else float(margin),
        skip,
    )


@torch.library.register_fake("mgccl::topk_hard_negatives")
def _topk_hard_negatives_fake(q, k, num, pos, q_group, k_group, exclude_self, max_sim, margin, skip):
    check_mining_inputs(q, k, num, pos, q_group, k_group, exclude_self, max_sim, margin, skip)
    n = q.shape[0]
    return q.new_empty((n, num), dtype=torch.int64), q.new_empty((n, num), dtype=torch.float32)


def check_loss_inputs(q, k, pos, neg_idx, scale, weight, reduction) -> None:
    """Metadata checks shared by the wrapper and the fake impl (index ranges are checked in
    kernels)."""
    _checks.check_loss_inputs(LOSS_OP, q, k, pos, scale, weight, reduction)
    _checks.check_dim(LOSS_OP, "neg_idx", neg_idx, 2, "[N, K]")
    if neg_idx.dtype != torch.int64:
        raise ValueError(f"{LOSS_OP}: neg_idx should be int64, got {neg_idx.dtype}")
    _checks.check_size(LOSS_OP, "neg_idx", neg_idx, 0, q.shape[0], "q.shape[0] (N)")
    _checks.check_same_device(LOSS_OP, "neg_idx", neg_idx, "q", q)


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
    """Contrastive loss of each row over its positive and its listed negatives only.

    ``l_i = logsumexp({s_i,pos[i]} U {s_i,j : j in neg_idx[i], j >= 0}) - s_i,pos[i]`` with
    ``s_ij = scale * <q_i, k_j>``; a key listed twice in ``neg_idx[i]`` counts twice. The
    logits are indexed dot products: no [N, K, D] tensor is built.

    Autocast (CPU, CUDA): ``q`` and ``k`` are cast to the autocast dtype (two castable dtypes
    are then accepted); the rest as given; see docs/ops.md.

    Args:
        q: [N, D] queries (float16, bfloat16, float32 or float64).
        k: [M, D] keys, same dtype and device as ``q``.
        pos: [N] int64, the positive key of each row, or -1 to ignore the row.
        neg_idx: [N, K] int64 negative keys per row, -1 as padding (``topk_hard_negatives``).
        scale: a float or a 0-dim tensor; a tensor that requires grad receives its gradient.
        weight: optional [N] per-row weights (no gradient flows to it); ignored rows never
            read theirs.
        reduction: "mean", "sum" or "none", as for :func:`mgccl_ops.contrastive_loss` (the
            mean divides by the signed total weight, 0 only when it is exactly 0; a NaN weight
            makes the mean and every gradient NaN).

    Returns:
        The loss: 0-dim, or [N] for "none" (0 for ignored rows), in float32 (float64 for
        float64 inputs). Gradients reach ``q`` and ``k`` (summed over duplicates) in their dtype.
        Second-order gradients are not supported: a backward with ``create_graph=True``
        raises a RuntimeError.
    """
    return hard_negative_loss_with_rows(q, k, pos, neg_idx, scale, weight=weight, reduction=reduction)[0]


def hard_negative_loss_with_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    pos: torch.Tensor,
    neg_idx: torch.Tensor,
    scale: float | torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`hard_negative_loss` and the unweighted row losses [N] (detached, 0 where ignored)."""
    scale_t = _checks.scale_tensor(LOSS_OP, scale, q)
    check_loss_inputs(q, k, pos, neg_idx, scale_t, weight, reduction)
    grad_enabled = torch.is_grad_enabled()
    grad_mask = [grad_enabled and t.requires_grad for t in (q, k, scale_t)]
    loss, row_loss, *_ = torch.ops.mgccl.hard_negative_loss.default(
        q, k, pos, neg_idx, scale_t, weight, reduction, grad_mask
    )
    return loss, row_loss.detach()


@torch.library.register_fake("mgccl::hard_negative_loss")
def _hard_negative_loss_fake(q, k, pos, neg_idx, scale, weight, reduction, grad_mask):
    check_loss_inputs(q, k, pos, neg_idx, scale, weight, reduction)
    acc = accumulation_dtype(q.dtype)
    n = q.shape[0]
    fused = reduction != "none"
    return (
        q.new_empty((n,) if reduction == "none" else (), dtype=acc),
        q.new_empty((n,), dtype=acc),
        *_checks.fake_gradients(q, k, scale, [fused and wanted for wanted in grad_mask]),
    )


@torch.library.register_fake("mgccl::hard_negative_loss_backward")
def _hard_negative_loss_backward_fake(row_grad, q, k, pos, neg_idx, scale, grad_mask):
    return _checks.fake_gradients(q, k, scale, grad_mask)


def _setup_context(ctx, inputs, output):
    q, k, pos, neg_idx, scale, weight, reduction, grad_mask = inputs
    _, _, grad_q, grad_k, grad_scale = output
    ctx.reduction = reduction
    ctx.grad_mask = list(grad_mask)
    if reduction == "none":
        ctx.save_for_backward(q, k, pos, neg_idx, scale, weight)
    else:
        ctx.save_for_backward(grad_q, grad_k, grad_scale)


def _backward(ctx, grad_loss, *_unused_output_grads):
    _double_backward.refuse_if_building_graph(LOSS_OP)
    if ctx.reduction == "none":
        q, k, pos, neg_idx, scale, weight = ctx.saved_tensors
        row_grad = grad_loss if weight is None else grad_loss * weight
        grad_q, grad_k, grad_scale = torch.ops.mgccl.hard_negative_loss_backward.default(
            row_grad, q, k, pos, neg_idx, scale, ctx.grad_mask
        )
    else:
        grad_q, grad_k, grad_scale = (g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
    want_q, want_k, want_scale = ctx.grad_mask
    return (
        grad_q if want_q else None,
        grad_k if want_k else None,
        None,
        None,
        grad_scale if want_scale else None,
        None,
        None,
        None,
    )


torch.library.register_autograd("mgccl::hard_negative_loss", _backward, setup_context=_setup_context)
_double_backward.register_refusing_autograd("hard_negative_loss_backward", LOSS_OP)
