"""Plain-PyTorch references of region merging and pooling (DESIGN.md op 5).

Written for clarity, not speed: average linkage rebuilds the region adjacency graph from the
pixels every round and recomputes every region mean from its pixels, exactly as the rule is
stated. Features are compared in float32 (float64 for float64 inputs); thresholds are compared
in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mgccl_ops._extension import _C
from mgccl_ops.ops._dtypes import accumulation_dtype
from mgccl_ops.ops.region_merge import threshold_tensor

EPS = 1e-12
# Offsets (dy, dx) of the neighbours that follow a pixel in raster order; every grid edge once.
NEIGHBOUR_OFFSETS = {4: ((0, 1), (1, 0)), 8: ((0, 1), (1, 0), (1, 1), (1, -1))}
# The automatic threshold: median minus AUTO_MAD_FACTOR scaled (MAD_TO_SIGMA) median absolute
# deviations; the constants are defined once, in csrc/auto_threshold_rule.h.
AUTO_MAD_FACTOR = _C.AUTO_MAD_FACTOR
MAD_TO_SIGMA = _C.MAD_TO_SIGMA


def grid_edges(height: int, width: int, connectivity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbouring pixel pairs of an H x W grid as raster indices: (src [E], dst [E]), src < dst."""
    src, dst = [], []
    for dy, dx in NEIGHBOUR_OFFSETS[connectivity]:
        ys = torch.arange(0, max(0, height - dy))
        xs = torch.arange(max(0, -dx), max(max(0, -dx), width - max(0, dx)))
        y, x = torch.meshgrid(ys, xs, indexing="ij")
        src.append((y * width + x).reshape(-1))
        dst.append(((y + dy) * width + x + dx).reshape(-1))
    return torch.cat(src), torch.cat(dst)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of a [E, C] and b [E, C] -> [E], in [-1, 1]; 0 for a zero row,
    NaN where a row is not finite (such a pair never merges)."""
    norms = a.norm(dim=1) * b.norm(dim=1)
    dots = (a * b).sum(1)
    nonzero = norms != 0
    sim = torch.where(nonzero, dots / torch.where(nonzero, norms, torch.ones_like(norms)), torch.zeros_like(dots))
    return sim.clamp(-1.0, 1.0)


def pixel_rows(feat: torch.Tensor) -> torch.Tensor:
    """One image's features [C, H, W] as rows [H*W, C] in the accumulation dtype."""
    channels, height, width = feat.shape
    return feat.to(accumulation_dtype(feat.dtype)).reshape(channels, height * width).T


def edge_similarities(feat: torch.Tensor, connectivity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image [C, H, W] -> (src [E], dst [E], sim [E]): the cosine similarity of each grid edge."""
    src, dst = grid_edges(feat.shape[1], feat.shape[2], connectivity)
    rows = pixel_rows(feat)
    return src, dst, cosine(rows[src], rows[dst])


def min_label_components(n: int, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Connected components of the graph on 0..n-1 with edges (src, dst): each node -> the
    smallest node of its component, by propagating minima until nothing changes."""
    labels = torch.arange(n)
    while True:
        updated = labels.clone()
        updated.scatter_reduce_(0, src, labels[dst], "amin")
        updated.scatter_reduce_(0, dst, labels[src], "amin")
        if torch.equal(updated, labels):
            return labels
        labels = updated


def compact_labels(first_pixel: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Labels naming each region by its first pixel [N] -> compact labels 0..num-1 in raster
    order of those first pixels, and num."""
    names, compact = torch.unique(first_pixel, sorted=True, return_inverse=True)
    return compact, names.numel()


def single_linkage(feat: torch.Tensor, threshold: float, connectivity: int) -> torch.Tensor:
    """One image [C, H, W] -> [H*W] region names: components of the edges with sim >= threshold."""
    src, dst, sim = edge_similarities(feat, connectivity)
    keep = sim.to(torch.float64) >= threshold
    return min_label_components(feat.shape[1] * feat.shape[2], src[keep], dst[keep])


def best_neighbours(a: torch.Tensor, b: torch.Tensor, sim: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For regions 0..n-1 (numbered in order of their names) adjacent by pairs (a, b) with
    similarity sim [P]: each region's most similar neighbour (ties: the smaller) -> (best [n],
    best_sim [n]); best is -1 for a region without neighbours."""
    rows = torch.cat([a, b])
    cols = torch.cat([b, a])
    sims = torch.cat([sim, sim])
    order = torch.argsort(cols, stable=True)
    order = order[torch.argsort(-sims[order], stable=True)]
    order = order[torch.argsort(rows[order], stable=True)]
    rows, cols, sims = rows[order], cols[order], sims[order]
    first = torch.ones_like(rows, dtype=torch.bool)
    first[1:] = rows[1:] != rows[:-1]
    best = torch.full((n,), -1, dtype=torch.int64)
    best_sim = torch.full((n,), float("nan"), dtype=sims.dtype)
    best[rows[first]] = cols[first]
    best_sim[rows[first]] = sims[first]
    return best, best_sim


def average_linkage(feat: torch.Tensor, threshold: float, connectivity: int) -> torch.Tensor:
    """One image [C, H, W] -> [H*W] region names after rounds of parallel agglomeration."""
    height, width = feat.shape[1], feat.shape[2]
    rows = F.normalize(pixel_rows(feat), dim=1, eps=EPS)
    src, dst = grid_edges(height, width, connectivity)
    region = torch.arange(height * width)  # each pixel -> the name (first pixel) of its region
    while True:
        names, index = torch.unique(region, sorted=True, return_inverse=True)
        n = names.numel()
        counts = torch.bincount(index, minlength=n).to(rows.dtype)
        means = torch.zeros(n, rows.shape[1], dtype=rows.dtype).index_add_(0, index, rows) / counts[:, None]
        a, b = index[src], index[dst]
        cross = a != b
        pairs = torch.unique(torch.stack([torch.minimum(a, b), torch.maximum(a, b)])[:, cross], dim=1)
        sim = cosine(means[pairs[0]], means[pairs[1]])
        best, best_sim = best_neighbours(pairs[0], pairs[1], sim, n)
        picked = (best >= 0) & (best_sim.to(torch.float64) >= threshold)
        if not picked.any():
            return region
        merged = min_label_components(n, torch.arange(n)[picked], best[picked])
        region = names[merged[index]]


def region_auto_threshold(feat: torch.Tensor, *, connectivity: int = 4) -> torch.Tensor:
    """Reference of :func:`mgccl_ops.region_auto_threshold`: feat [B, C, H, W] -> [B] float64.

    Per image, over the cosine similarities s of all neighbouring pixel pairs:
    ``median(s) - AUTO_MAD_FACTOR * MAD_TO_SIGMA * median(|s - median(s)|)`` (lower medians, taken in
    the similarities' dtype: float32, float64 for float64 features); +inf for an image without
    neighbouring pairs.
    """
    out = torch.full((feat.shape[0],), float("inf"), dtype=torch.float64)
    for b in range(feat.shape[0]):
        sim = edge_similarities(feat[b], connectivity)[2]
        sim = sim[~sim.isnan()]  # edges touching a non-finite feature: never merged, not counted
        if sim.numel() > 0:
            median = sim.median()
            mad = (sim - median).abs().median()
            out[b] = median.double() - AUTO_MAD_FACTOR * MAD_TO_SIGMA * mad.double()
    return out


def thresholds(threshold: float | str | torch.Tensor, feat: torch.Tensor, connectivity: int) -> list[float]:
    """The per-image thresholds [B] as floats (parsed and checked as :func:`mgccl_ops.region_merge` does)."""
    parsed = threshold_tensor(threshold, feat)
    if parsed is None:
        return region_auto_threshold(feat, connectivity=connectivity).tolist()
    return parsed.tolist()


def region_merge(
    feat: torch.Tensor, threshold: float | str | torch.Tensor, *, connectivity: int = 4, linkage: str = "average"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`mgccl_ops.region_merge`: feat [B, C, H, W] -> (labels [B, H, W], num [B])."""
    merge = {"single": single_linkage, "average": average_linkage}[linkage]
    batch, _, height, width = feat.shape
    labels = torch.zeros(batch, height * width, dtype=torch.int64)
    num = torch.zeros(batch, dtype=torch.int64)
    for b, thr in enumerate(thresholds(threshold, feat, connectivity)):
        if height * width > 0:
            labels[b], num[b] = compact_labels(merge(feat[b].detach(), thr, connectivity))
    return labels.reshape(batch, height, width), num


def region_pool(x: torch.Tensor, labels: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`mgccl_ops.region_pool`: x [B, C, H, W], labels [B, H, W], num [B] ->
    [B, R, C] region means (R = num.max(); regions without pixels are 0), in x's dtype."""
    batch, channels, height, width = x.shape
    regions = int(num.max()) if batch > 0 else 0
    acc = accumulation_dtype(x.dtype)
    flat = labels.reshape(batch, height * width)
    rows = x.to(acc).reshape(batch, channels, height * width).transpose(1, 2)  # [B, H*W, C]
    # Sums by scatter-add, not a one-hot matrix product: a NaN pixel stays in its own region.
    sums = torch.zeros(batch, regions, channels, dtype=acc).scatter_add(1, flat[..., None].expand_as(rows), rows)
    counts = torch.zeros(batch, regions, dtype=acc).scatter_add_(1, flat, torch.ones_like(flat, dtype=acc))
    return (sums / counts.clamp_min(1)[..., None]).to(x.dtype)


def region_broadcast(pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`mgccl_ops.region_broadcast`: pooled [B, R, C], labels [B, H, W] ->
    [B, C, H, W] with each pixel taking its region's row."""
    batch, _, channels = pooled.shape
    index = labels.reshape(batch, labels.shape[1] * labels.shape[2], 1).expand(-1, -1, channels)
    return pooled.gather(1, index).transpose(1, 2).reshape(batch, channels, *labels.shape[1:])


def adaptive_semantic_unit(
    pixel_feat: torch.Tensor,
    text_emb: torch.Tensor,
    *,
    threshold: float | str | torch.Tensor = "auto",
    connectivity: int = 4,
    linkage: str = "average",
    guide: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference of :func:`mgccl_ops.adaptive_semantic_unit`: pixel_feat [B, C, H, W], text_emb
    [T, C] -> [B, T, H, W]: per-pixel cosine logits averaged within the regions merged on
    ``guide`` [B, C', H, W] (default ``pixel_feat``)."""
    merge_on = pixel_feat if guide is None else guide
    labels, num = region_merge(merge_on.detach(), threshold, connectivity=connectivity, linkage=linkage)
    acc = accumulation_dtype(pixel_feat.dtype)
    pixels = F.normalize(pixel_feat.to(acc), dim=1, eps=EPS)
    texts = F.normalize(text_emb.to(acc), dim=1, eps=EPS)
    logits = torch.einsum("bchw,tc->bthw", pixels, texts)
    return region_broadcast(region_pool(logits, labels, num), labels).to(pixel_feat.dtype)
