"""Fused pairwise-sigmoid (SigLIP) contrastive loss: typed wrapper, fake impl, autograd.

The kernel (``torch.ops.mgccl.sigmoid_contrastive_loss``) returns the loss and, when asked,
its gradients with respect to q, k, scale and bias, computed in the same sweeps over the key
bank; backward only rescales them by the incoming gradient. The N x M logits never exist.
"""

from __future__ import annotations

import math

import torch

from mgccl_ops.ops import _checks
from mgccl_ops.ops._dtypes import accumulation_dtype

OP = "sigmoid_contrastive_loss"


def check_inputs(q, k, scale, bias) -> None:
    """Metadata checks shared by the wrapper and the fake impl (finiteness is checked in kernels)."""
    _checks.check_query_key_pair(OP, q, k)
    _checks.check_same_device(OP, "scale", scale, "q", q)
    _checks.check_same_device(OP, "bias", bias, "q", q)


def scalar_tensor(name: str, value: float | torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``value`` (``scale`` or ``bias``) as a 0-dim tensor on ``ref``'s device.

    A tensor passes through unchanged (so its gradient flows) after checking it is 0-dim and
    floating; a Python number becomes float64 for float64 inputs, else float32.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{OP}: {name} should be a float or a 0-dim tensor, got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise ValueError(f"{OP}: {name} should be a floating tensor, got {value.dtype}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{OP}: {name} should be a float or a 0-dim tensor, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{OP}: {name} should be finite, got {value}")
    return torch.tensor(float(value), dtype=accumulation_dtype(ref.dtype), device=ref.device)


def sigmoid_contrastive_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float | torch.Tensor,
    bias: float | torch.Tensor,
) -> torch.Tensor:
    """Pairwise-sigmoid (SigLIP) loss of queries against keys, without the N x M logits.

    ``z_ij = scale * <q_i, k_j> + bias``; the pair (i, j) is positive when ``i == j`` (label +1)
    and negative otherwise (label -1); the loss is ``-sum_ij log sigmoid(label_ij z_ij) / N``,
    exactly open_clip's ``SigLipLoss`` on one process (its ``logit_scale`` is ``scale``, already
    exponentiated, and its ``logit_bias`` is ``bias``). See ``docs/ops.md``.

    Args:
        q: [N, D] queries, e.g. image features (float16, bfloat16, float32 or float64).
        k: [M, D] keys, e.g. text features, same dtype and device as ``q``.
        scale: a float or a 0-dim floating tensor; a tensor that requires grad receives it.
        bias: a float or a 0-dim floating tensor; a tensor that requires grad receives it.

    Returns:
        The 0-dim loss in float32 (float64 for float64 inputs); 0 with zero gradients when
        N == 0. Gradients reach ``q`` and ``k`` in their dtype.
    """
    _checks.check_tensor(OP, "q", q)
    scale_t = scalar_tensor("scale", scale, q)
    bias_t = scalar_tensor("bias", bias, q)
    check_inputs(q, k, scale_t, bias_t)
    grad_enabled = torch.is_grad_enabled()
    grad_mask = [grad_enabled and t.requires_grad for t in (q, k, scale_t, bias_t)]
    return torch.ops.mgccl.sigmoid_contrastive_loss.default(q, k, scale_t, bias_t, grad_mask)[0]


@torch.library.register_fake("mgccl::sigmoid_contrastive_loss")
def _sigmoid_contrastive_loss_fake(q, k, scale, bias, grad_mask):
    check_inputs(q, k, scale, bias)
    return (
        q.new_empty((), dtype=accumulation_dtype(q.dtype)),
        *_checks.fake_gradients(q, k, scale, grad_mask[:3]),
        bias.new_empty(() if grad_mask[3] else (0,)),
    )


def _setup_context(ctx, inputs, output):
    *_, grad_mask = inputs
    _, grad_q, grad_k, grad_scale, grad_bias = output
    ctx.grad_mask = list(grad_mask)
    ctx.save_for_backward(grad_q, grad_k, grad_scale, grad_bias)


def _backward(ctx, grad_loss, *_unused_output_grads):
    if torch.is_grad_enabled():
        raise RuntimeError(f"{OP}: double backward is not supported by {OP} (backward ran with create_graph=True)")
    grads = [g * grad_loss.to(g.dtype) if wanted else None for g, wanted in zip(ctx.saved_tensors, ctx.grad_mask)]
    return (*grads, None)


torch.library.register_autograd("mgccl::sigmoid_contrastive_loss", _backward, setup_context=_setup_context)
