"""Dense predictions at three unit granularities: pixels, feature groups, adaptive regions.

All functions map dense features to class logits (cosine similarities) on the feature
grid; :func:`predict` turns logits into labels at image size.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

UNITS = ("pixel", "group", "adaptive")


def pixel_logits(dense: torch.Tensor, grid: tuple[int, int], text: torch.Tensor) -> torch.Tensor:
    """Per-pixel units: cosine logits [B, T, h, w] of dense [B, P, D] against text [T, D]."""
    b = dense.shape[0]
    logits = torch.einsum("bpd,td->btp", F.normalize(dense.float(), dim=-1), F.normalize(text.float(), dim=-1))
    return logits.reshape(b, -1, *grid)


def kmeans_labels(dense: torch.Tensor, groups: int, iters: int = 10) -> torch.Tensor:
    """Cosine k-means of each image's features [B, P, D] into ``groups`` clusters.

    Deterministic: centres start at farthest-point samples from pixel 0. Returns int64
    labels [B, P] in 0..groups-1 (a cluster may end up empty).
    """
    x = F.normalize(dense.float(), dim=-1)
    b, p, _ = x.shape
    k = min(groups, p)
    picks = torch.zeros(b, k, dtype=torch.int64, device=x.device)
    nearest = torch.full((b, p), -2.0, device=x.device)
    for i in range(1, k):
        last = x.gather(1, picks[:, i - 1, None, None].expand(-1, 1, x.shape[-1]))
        nearest = torch.maximum(nearest, (x * last).sum(-1))
        picks[:, i] = nearest.argmin(1)
    centres = x.gather(1, picks[..., None].expand(-1, -1, x.shape[-1]))
    for _ in range(iters):
        labels = torch.einsum("bpd,bkd->bpk", x, centres).argmax(-1)
        sums = torch.zeros_like(centres).scatter_add_(1, labels[..., None].expand_as(x), x)
        centres = torch.where(sums.norm(dim=-1, keepdim=True) > 0, F.normalize(sums, dim=-1), centres)
    return torch.einsum("bpd,bkd->bpk", x, centres).argmax(-1)


def _compact(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Renumber labels [B, h, w] to 0..num-1 per image; returns (labels, num [B])."""
    out = torch.empty_like(labels)
    num = torch.empty(labels.shape[0], dtype=torch.int64, device=labels.device)
    for i, lab in enumerate(labels):
        uniq, inv = torch.unique(lab, return_inverse=True)
        out[i], num[i] = inv, uniq.numel()
    return out, num


def group_logits(
    ops: ModuleType, dense: torch.Tensor, grid: tuple[int, int], text: torch.Tensor, groups: int = 8
) -> torch.Tensor:
    """Per-group units: pixel logits averaged over k-means clusters of the dense features.

    A fixed number of groups per image, with no regard for adjacency, as in grouping
    models: distinct objects with similar features share a group (under-segmentation).
    Returns [B, T, h, w].
    """
    labels, num = _compact(kmeans_labels(dense, groups).reshape(dense.shape[0], *grid))
    logits = pixel_logits(dense, grid, text)
    return ops.region_broadcast(ops.region_pool(logits, labels, num), labels)


def adaptive_logits(
    ops: ModuleType,
    dense: torch.Tensor,
    grid: tuple[int, int],
    text: torch.Tensor,
    threshold: float | str = 0.9,
    images: torch.Tensor | None = None,
    colour_weight: float = 1.0,
) -> torch.Tensor:
    """Adaptive semantic units: pixel logits averaged within ``region_merge`` regions
    (``ops.adaptive_semantic_unit``).

    With ``images`` [B, 3, H, W] (0..255) and ``colour_weight > 0`` the units are formed at
    image resolution: the dense features are upsampled bilinearly to H x W and the regions
    are merged on a guide of the normalised upsampled features concatenated with
    ``colour_weight`` times the pixel colours (0..1), so that units follow the colour edges
    of the image, which the stride-4 features blur. Returns [B, T, H, W]; otherwise the
    units are formed on the feature grid and [B, T, h, w] is returned.
    """
    b, _, d = dense.shape
    feat = dense.float().transpose(1, 2).reshape(b, d, *grid).contiguous()
    text = F.normalize(text.float(), dim=-1)
    if images is None or colour_weight <= 0:
        return ops.adaptive_semantic_unit(feat, text, threshold=threshold)
    feat = F.normalize(F.interpolate(feat, size=images.shape[-2:], mode="bilinear", align_corners=False), dim=1)
    guide = torch.cat([feat, colour_weight * images.float().to(feat.device) / 255], 1)
    return ops.adaptive_semantic_unit(feat, text, threshold=threshold, guide=guide)


def predict(
    logits: torch.Tensor, size: tuple[int, int], background_threshold: float | None, background_key: bool = False
) -> torch.Tensor:
    """Labels int64 [B, H, W] from grid logits [B, T, h, w], upsampled bilinearly to ``size``.

    With ``background_threshold`` set, label 0 is background (best logit below it) and class
    ``t`` becomes ``t + 1``; otherwise labels are the argmax class indices. With
    ``background_key`` the last of the T logit rows is a learned background key, not a
    class: a pixel whose key logit beats every class logit is background as well.
    """
    up = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    if background_key:
        up, key = up[:, :-1], up[:, -1]
    best, arg = up.max(1)
    if background_threshold is None:
        return arg
    foreground = best >= background_threshold
    if background_key:
        foreground &= best > key
    return torch.where(foreground, arg + 1, torch.zeros_like(arg))
