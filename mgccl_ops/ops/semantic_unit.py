"""Adaptive semantic unit (DESIGN.md op 5): per-pixel text logits averaged within merged regions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mgccl_ops.ops import _checks
from mgccl_ops.ops._dtypes import accumulation_dtype
from mgccl_ops.ops.region_merge import region_merge
from mgccl_ops.ops.region_pool import region_broadcast, region_pool

EPS = 1e-12


def adaptive_semantic_unit(
    pixel_feat: torch.Tensor,
    text_emb: torch.Tensor,
    *,
    threshold: float | str | torch.Tensor = "auto",
    connectivity: int = 4,
    linkage: str = "average",
    guide: torch.Tensor | None = None,
) -> torch.Tensor:
    """Text logits of every pixel, averaged over the adaptive region the pixel belongs to.

    The regions come from ``region_merge(guide, threshold, connectivity=..., linkage=...)``
    (``guide`` defaults to ``pixel_feat``): between per-pixel units (threshold > 1, plain per-pixel logits) and one unit
    per image (threshold -1). A pixel's logit for text t is the cosine similarity of its feature
    and t's embedding. That is linear in the normalised pixel feature, so the region average is
    the region's mean normalised feature times t's normalised embedding: one [R, C] x [C, T]
    product per image instead of a [H*W, C] x [C, T] one.

    Autocast (CPU, CUDA): the region ops keep their input dtype and the region-by-text product
    is autocast like any matmul; see docs/ops.md.

    Args:
        pixel_feat: [B, C, H, W] dense features (float16, bfloat16, float32, float64).
        text_emb: [T, C] text embeddings, same dtype.
        threshold: the merge threshold, as in :func:`region_merge` ("auto" by default).
        connectivity: 4 or 8.
        linkage: "average" or "single".
        guide: optional [B, C', H, W] features the regions are merged on instead of
            ``pixel_feat``, e.g. ``pixel_feat`` concatenated with the image's colours so
            that regions follow colour edges; any float dtype.

    Returns:
        [B, T, H, W] logits in pixel_feat's dtype, differentiable in ``pixel_feat`` and
        ``text_emb`` (the regions themselves carry no gradient).
    """
    op = "adaptive_semantic_unit"
    _checks.check_dim(op, "pixel_feat", pixel_feat, 4, "[B, C, H, W]")
    _checks.check_dim(op, "text_emb", text_emb, 2, "[T, C]")
    _checks.check_float(op, "pixel_feat", pixel_feat)
    _checks.check_same_dtype(op, "text_emb", text_emb, "pixel_feat", pixel_feat)
    _checks.check_size(op, "text_emb", text_emb, 1, pixel_feat.shape[1], "pixel_feat.shape[1] (C)")
    if text_emb.device != pixel_feat.device:
        raise ValueError(f"{op}: text_emb is on {text_emb.device} but pixel_feat is on {pixel_feat.device}")
    if guide is None:
        guide = pixel_feat
    else:
        _checks.check_dim(op, "guide", guide, 4, "[B, C', H, W]")
        if guide.shape[0] != pixel_feat.shape[0] or guide.shape[2:] != pixel_feat.shape[2:]:
            raise ValueError(
                f"{op}: guide must be [B, C', H, W] with pixel_feat's B, H, W = "
                f"{pixel_feat.shape[0]}, {pixel_feat.shape[2]}, {pixel_feat.shape[3]}; got {tuple(guide.shape)}"
            )
        if guide.device != pixel_feat.device:
            raise ValueError(f"{op}: guide is on {guide.device} but pixel_feat is on {pixel_feat.device}")
    try:
        labels, num = region_merge(guide, threshold, connectivity=connectivity, linkage=linkage)
    except (ValueError, TypeError, RuntimeError) as error:
        # The caller passed threshold, connectivity and linkage to this op: say so.
        raise type(error)(f"{op}: {error}") from error
    acc = accumulation_dtype(pixel_feat.dtype)
    pixels = F.normalize(pixel_feat.to(acc), dim=1, eps=EPS)
    texts = F.normalize(text_emb.to(acc), dim=1, eps=EPS)
    region_logits = region_pool(pixels, labels, num) @ texts.T  # [B, R, T]
    return region_broadcast(region_logits, labels).to(pixel_feat.dtype)
