"""Fused similarity + contrastive loss (DESIGN.md op 1): typed wrapper, fake impl, autograd.

The kernel (``torch.ops.mgccl.contrastive_loss``) returns the loss together with the per-row
and per-column log-sum-exps it keeps for backward, and for reduction "mean"/"sum" also the
gradients of the loss, computed in the same sweep over the key bank; backward then only
rescales them by the incoming gradient. Reduction "none" recomputes in a backward sweep
(``torch.ops.mgccl.contrastive_loss_backward``) since the per-row incoming gradient is needed.
"""

from __future__ import annotations

import torch

from mgccl_ops.ops import _checks, _double_backward
from mgccl_ops.ops._dtypes import accumulation_dtype

OP = "contrastive_loss"


def check_inputs(q, k, pos, scale, weight, reduction, symmetric) -> None:
    """Metadata checks shared by the wrapper and the fake impl (values are checked in kernels)."""
    _checks.check_loss_inputs(OP, q, k, pos, scale, weight, reduction)
    if symmetric and q.shape[0] != k.shape[0]:
        raise ValueError(
            f"{OP}: symmetric=True needs as many queries as keys, got N = {q.shape[0]} and M = {k.shape[0]}"
        )


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
    """Contrastive (InfoNCE) loss of queries against a key bank, without the N x M logits.

    Autocast (CPU, CUDA): ``q`` and ``k`` are cast to the autocast dtype (two castable dtypes
    are then accepted); the rest as given; see docs/ops.md.

    Args:
        q: [N, D] queries (float16, bfloat16, float32 or float64).
        k: [M, D] keys, same dtype and device as ``q``.
        pos: [N] int64, the positive key of each row, or -1 to ignore the row.
        scale: a float or a 0-dim tensor (e.g. ``logit_scale.exp()``); logits are
            ``scale * <q_i, k_j>``. A tensor that requires grad receives its gradient.
        weight: optional [N] per-row weights (any floating dtype; no gradient flows to it).
            Ignored rows never read theirs (a NaN there changes nothing).
        reduction: "mean" (sum of ``w_i l_i`` over ``W``, the sum of ``w_i`` of rows with
            ``pos >= 0`` whatever its sign; 0 with zero gradients only when ``W == 0``
            exactly; NaN, with NaN gradients, when a weight is NaN), "sum" or "none" (there a
            NaN weight poisons only its own row's terms).
        symmetric: CLIP's two-sided loss; needs N == M and ``pos`` a permutation of 0..M-1.
            Row i's loss becomes the mean of its row loss and the loss of column ``pos[i]``.

    Returns:
        The loss: a 0-dim tensor, or [N] for reduction "none" (0 for ignored rows), in float32
        (float64 for float64 inputs). Gradients reach ``q`` and ``k`` in their dtype.
        Second-order gradients are not supported: a backward with ``create_graph=True``
        raises a RuntimeError (docs/ops.md, "Edge cases of the losses").
    """
    scale_t = _checks.scale_tensor(OP, scale, q)
    check_inputs(q, k, pos, scale_t, weight, reduction, symmetric)
    grad_enabled = torch.is_grad_enabled()
    grad_mask = [grad_enabled and t.requires_grad for t in (q, k, scale_t)]
    outputs = torch.ops.mgccl.contrastive_loss.default(q, k, pos, scale_t, weight, reduction, symmetric, grad_mask)
    return outputs[0]


@torch.library.register_fake("mgccl::contrastive_loss")
def _contrastive_loss_fake(q, k, pos, scale, weight, reduction, symmetric, grad_mask):
    check_inputs(q, k, pos, scale, weight, reduction, symmetric)
    acc = accumulation_dtype(q.dtype)
    n, m = q.shape[0], k.shape[0]
    fused = reduction != "none"
    return (
        q.new_empty((n,) if reduction == "none" else (), dtype=acc),
        q.new_empty((n,), dtype=acc),
        q.new_empty((m if symmetric else 0,), dtype=acc),
        *_checks.fake_gradients(q, k, scale, [fused and wanted for wanted in grad_mask]),
    )


@torch.library.register_fake("mgccl::contrastive_loss_backward")
def _contrastive_loss_backward_fake(row_grad, q, k, pos, scale, row_lse, col_lse, symmetric, grad_mask):
    return _checks.fake_gradients(q, k, scale, grad_mask)


def _setup_context(ctx, inputs, output):
    q, k, pos, scale, weight, reduction, symmetric, grad_mask = inputs
    _, row_lse, col_lse, grad_q, grad_k, grad_scale = output
    ctx.reduction = reduction
    ctx.symmetric = symmetric
    ctx.grad_mask = list(grad_mask)
    if reduction == "none":
        ctx.save_for_backward(q, k, pos, scale, weight, row_lse, col_lse)
    else:
        ctx.save_for_backward(grad_q, grad_k, grad_scale)


def _backward(ctx, grad_loss, *_unused_output_grads):
    _double_backward.refuse_if_building_graph(OP)
    if ctx.reduction == "none":
        q, k, pos, scale, weight, row_lse, col_lse = ctx.saved_tensors
        row_grad = grad_loss if weight is None else grad_loss * weight
        grad_q, grad_k, grad_scale = torch.ops.mgccl.contrastive_loss_backward.default(
            row_grad, q, k, pos, scale, row_lse, col_lse, ctx.symmetric, ctx.grad_mask
        )
    else:
        grad_q, grad_k, grad_scale = (g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
    want_q, want_k, want_scale = ctx.grad_mask
    return (
        grad_q if want_q else None,
        grad_k if want_k else None,
        None,
        grad_scale if want_scale else None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd("mgccl::contrastive_loss", _backward, setup_context=_setup_context)
_double_backward.register_refusing_autograd("contrastive_loss_backward", OP)
