"""Refine pixel pseudo-labels along image colour edges (pixel-adaptive label propagation).

Dense features from a convolutional encoder spill across object boundaries: a background
cell next to an object carries some of the object's features and so takes the object as its
pseudo label, and training on that label widens the halo further. Propagating the label
scores a few times over each cell's 3x3 neighbourhood, weighted by how alike the cells'
colours are, lets scores flow within a colour-coherent area but hardly across a colour
edge, so pseudo labels follow the object outlines the image shows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def colour_affinity(images: torch.Tensor, grid: tuple[int, int], tau: float) -> torch.Tensor:
    """Weights [B, 9, h*w] of each grid cell's 3x3 neighbours (itself included), summing to 1.

    Args:
        images: [B, 3, H, W] with values in 0..255; each cell's colour is the mean over the
            pixels it covers.
        grid: (h, w) of the feature grid.
        tau: colour distance (0..1 RGB units) at which a neighbour's weight falls by e.
    """
    cells = F.adaptive_avg_pool2d(images.float() / 255, grid)  # [B, 3, h, w]
    b = cells.shape[0]
    padded = F.pad(cells, (1, 1, 1, 1), mode="replicate")
    neighbours = F.unfold(padded, 3).view(b, 3, 9, -1)  # [B, 3, 9, h*w]
    distance = (neighbours - cells.flatten(2)[:, :, None]).norm(dim=1)  # [B, 9, h*w]
    return torch.softmax(-distance / tau, dim=1)


def propagate(scores: torch.Tensor, affinity: torch.Tensor, grid: tuple[int, int], iters: int) -> torch.Tensor:
    """Scores [B, P, K] averaged ``iters`` times over the neighbours weighted by ``affinity``.

    Args:
        scores: [B, P, K] per-cell scores (e.g. label probabilities), P = h * w.
        affinity: [B, 9, P] from :func:`colour_affinity`.
        grid: (h, w).
        iters: propagation steps.
    """
    b, p, k = scores.shape
    x = scores.transpose(1, 2).reshape(b, k, *grid)
    for _ in range(iters):
        neighbours = F.unfold(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3).view(b, k, 9, p)
        x = (neighbours * affinity[:, None]).sum(2).view(b, k, *grid)
    return x.flatten(2).transpose(1, 2)
