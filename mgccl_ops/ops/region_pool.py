"""Region pooling (DESIGN.md op 5): typed wrappers, fake impls and autograd of ``region_pool``
and ``region_broadcast``, and of ``region_sum``, the adjoint of broadcasting.

``region_pool``'s output [B, R, C] has R = num.max(), a value of the data. Its fake impl
declares R with ``ctx.new_dynamic_size()``, so under ``torch.compile`` R is an unbacked
symbolic size and the op traces without a graph break and without reading ``num``.

Gradients: pooling's backward broadcasts grad / count back to the pixels (region_broadcast);
broadcasting's backward sums the gradient over each region (region_sum), whose backward is a
broadcast again, so every gradient is itself differentiable.
"""

from __future__ import annotations

import torch

from mgccl_ops.ops import _checks
from mgccl_ops.ops._dtypes import accumulation_dtype


def check_labels(op: str, labels: torch.Tensor, batch: int, ref: torch.Tensor) -> None:
    _checks.check_dim(op, "labels", labels, 3, "[B, H, W]")
    if labels.dtype != torch.int64:
        raise ValueError(f"{op}: labels should be int64, got {labels.dtype}")
    _checks.check_size(op, "labels", labels, 0, batch, "B")
    if labels.device != ref.device:
        raise ValueError(f"{op}: labels is on {labels.device} but the features are on {ref.device}")


def check_pixels(op: str, x: torch.Tensor, labels: torch.Tensor) -> None:
    """x [B, C, H, W] floating and labels [B, H, W] int64 of the same image size."""
    _checks.check_dim(op, "x", x, 4, "[B, C, H, W]")
    _checks.check_float(op, "x", x)
    check_labels(op, labels, x.shape[0], x)
    if tuple(labels.shape[1:]) != tuple(x.shape[2:]):
        raise ValueError(
            f"{op}: labels should have shape [B, H, W] = {[x.shape[0], *x.shape[2:]]} to match x, "
            f"got {tuple(labels.shape)}"
        )


def check_pool_inputs(x: torch.Tensor, labels: torch.Tensor, num: torch.Tensor) -> None:
    check_pixels("region_pool", x, labels)
    _checks.check_index("region_pool", "num", num, x.shape[0], "B")
    _checks.check_same_device("region_pool", "num", num, "x", x)


def region_pool(x: torch.Tensor, labels: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over each region, differentiable in ``x``.

    Autocast (CPU, CUDA): no cast, the input dtype is kept; see docs/ops.md.

    Args:
        x: [B, C, H, W] floating (accumulated in float32, float64 for float64).
        labels: [B, H, W] int64, each image's labels in [0, num[b]) (e.g. from region_merge).
        num: [B] int64 regions per image.

    Returns:
        [B, R, C] in x's dtype with R = num.max(): row r of image b is the mean of x over the
        pixels labelled r, and 0 for a region without pixels (r >= num[b] included).
    """
    check_pool_inputs(x, labels, num)
    return torch.ops.mgccl.region_pool.default(x, labels, num)[0]


def region_broadcast(pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Scatters one row per region back to the pixels: the inverse of :func:`region_pool`.

    Autocast (CPU, CUDA): no cast, the input dtype is kept; see docs/ops.md.

    Args:
        pooled: [B, R, C] floating.
        labels: [B, H, W] int64 in [0, R).

    Returns:
        [B, C, H, W] with ``out[b, :, y, x] = pooled[b, labels[b, y, x]]``, differentiable in
        ``pooled``.
    """
    check_broadcast_inputs(pooled, labels)
    return torch.ops.mgccl.region_broadcast.default(pooled, labels)


def check_broadcast_inputs(pooled: torch.Tensor, labels: torch.Tensor) -> None:
    _checks.check_dim("region_broadcast", "pooled", pooled, 3, "[B, R, C]")
    _checks.check_float("region_broadcast", "pooled", pooled)
    check_labels("region_broadcast", labels, pooled.shape[0], pooled)


@torch.library.register_fake("mgccl::region_pool")
def _region_pool_fake(x, labels, num):
    check_pool_inputs(x, labels, num)
    regions = torch.library.get_ctx().new_dynamic_size()
    batch, channels = x.shape[:2]
    return x.new_empty((batch, regions, channels)), labels.new_empty((batch, regions))


@torch.library.register_fake("mgccl::region_broadcast")
def _region_broadcast_fake(pooled, labels):
    check_broadcast_inputs(pooled, labels)
    batch, _, channels = pooled.shape
    return pooled.new_empty((batch, channels, *labels.shape[1:]))


@torch.library.register_fake("mgccl::region_sum")
def _region_sum_fake(x, labels, num_regions):
    check_pixels("region_sum", x, labels)
    return x.new_empty((x.shape[0], num_regions, x.shape[1]))


def _pool_setup_context(ctx, inputs, output):
    _, labels, _ = inputs
    _, counts = output
    ctx.save_for_backward(labels, counts)


def _pool_backward(ctx, grad_pooled, _grad_counts):
    labels, counts = ctx.saved_tensors
    acc = accumulation_dtype(grad_pooled.dtype)
    per_pixel = (grad_pooled.to(acc) / counts.clamp_min(1).unsqueeze(-1).to(acc)).to(grad_pooled.dtype)
    return torch.ops.mgccl.region_broadcast.default(per_pixel, labels), None, None


def _broadcast_setup_context(ctx, inputs, output):
    pooled, labels = inputs
    ctx.num_regions = pooled.shape[1]
    ctx.save_for_backward(labels)


def _broadcast_backward(ctx, grad_out):
    (labels,) = ctx.saved_tensors
    return torch.ops.mgccl.region_sum.default(grad_out, labels, ctx.num_regions), None


def _sum_setup_context(ctx, inputs, output):
    _, labels, _ = inputs
    ctx.save_for_backward(labels)


def _sum_backward(ctx, grad_out):
    (labels,) = ctx.saved_tensors
    return torch.ops.mgccl.region_broadcast.default(grad_out, labels), None, None


torch.library.register_autograd("mgccl::region_pool", _pool_backward, setup_context=_pool_setup_context)
torch.library.register_autograd("mgccl::region_broadcast", _broadcast_backward, setup_context=_broadcast_setup_context)
torch.library.register_autograd("mgccl::region_sum", _sum_backward, setup_context=_sum_setup_context)
