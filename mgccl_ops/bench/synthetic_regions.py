"""Generated piecewise-constant feature images with noise, and the adjusted Rand index.

Shared by the region-merging benchmark and the measurement that chose ``threshold="auto"``.
An image is a Voronoi partition of the grid into ``segments`` cells (convex, hence connected),
each with its own unit feature; every pixel adds Gaussian noise of norm about ``noise``.
"""

from __future__ import annotations

import numpy as np
import torch


def piecewise_constant_images(
    batch: int,
    channels: int,
    height: int,
    width: int,
    *,
    segments: int,
    noise: float,
    correlation: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (feat [B, C, H, W] float32, truth [B, H, W] int64 Voronoi cell of each pixel).

    Cell features are ``sqrt(rho) * shared + sqrt(1 - rho) * own`` (rho = ``correlation``, each
    term a random unit vector), so two cells' features have cosine similarity about rho; noise
    is N(0, noise^2 / C) per channel, a vector of norm about ``noise``.
    """
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    grid = torch.stack([ys.reshape(-1), xs.reshape(-1)], 1).float()  # [H*W, 2]
    feats, truths = [], []
    for _ in range(batch):
        sites = torch.rand(segments, 2, generator=generator) * torch.tensor([height, width])
        truth = torch.cdist(grid, sites).argmin(1)  # [H*W]
        shared = torch.nn.functional.normalize(torch.randn(channels, generator=generator), dim=0)
        own = torch.nn.functional.normalize(torch.randn(segments, channels, generator=generator), dim=1)
        cells = correlation**0.5 * shared + (1 - correlation) ** 0.5 * own  # [segments, C]
        pixels = cells[truth] + noise / channels**0.5 * torch.randn(height * width, channels, generator=generator)
        feats.append(pixels.T.reshape(channels, height, width))
        truths.append(truth.reshape(height, width))
    return torch.stack(feats), torch.stack(truths)


def adjusted_rand_index(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Adjusted Rand index (Hubert and Arabie) of two labelings of the same pixels: 1 for the
    same partition, about 0 for independent ones."""
    a = np.unique(np.asarray(a).reshape(-1), return_inverse=True)[1]
    b = np.unique(np.asarray(b).reshape(-1), return_inverse=True)[1]
    n = a.size
    table = np.bincount(a * (b.max() + 1) + b, minlength=(a.max() + 1) * (b.max() + 1)).astype(np.float64)

    def pairs(counts: np.ndarray) -> float:
        return float((counts * (counts - 1) / 2).sum())

    both = pairs(table)
    rows = pairs(table.reshape(a.max() + 1, b.max() + 1).sum(1))
    cols = pairs(table.reshape(a.max() + 1, b.max() + 1).sum(0))
    expected = rows * cols / (n * (n - 1) / 2) if n > 1 else 0.0
    maximum = (rows + cols) / 2
    return 1.0 if maximum == expected else (both - expected) / (maximum - expected)
