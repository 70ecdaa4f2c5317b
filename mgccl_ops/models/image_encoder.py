"""A small convolutional dense image encoder (stride 4) that trains on a CPU in minutes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False),
        nn.GroupNorm(8, cout),
        nn.ReLU(inplace=True),
    )


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            _conv(channels, channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(8, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class DenseImageEncoder(nn.Module):
    """Image [B, 3, H, W] -> dense features [B, P, D] and a global embedding [B, D].

    Two stride-2 stages bring the image to an (H/4) x (W/4) grid; residual blocks of 3x3
    convolutions follow and a 1x1 convolution projects to D. The global embedding is the
    normalised mean of the un-normalised dense features, so both live in one space.
    ``P = (H/4) * (W/4)``.

    The receptive field is kept local on purpose (7 + 8 * 2 * blocks pixels: 55 with three
    blocks, an object's size): a pixel whose field spans the whole image can describe objects
    it does not lie on, and contrastive training then has no reason to put an object's
    features on the object's pixels.

    Args:
        dim: embedding width D.
        width: channels of the residual stage.
        blocks: residual blocks.
    """

    stride = 4

    def __init__(self, dim: int = 64, width: int = 64, blocks: int = 3):
        super().__init__()
        self.stem = nn.Sequential(_conv(3, 32, stride=2), _conv(32, width, stride=2))
        self.blocks = nn.Sequential(*[_Residual(width) for _ in range(blocks)])
        self.head = nn.Conv2d(width, dim, 1)
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Encode uint8 or float images [B, 3, H, W] with values in 0..255.

        Returns:
            dense: [B, P, D] unit-norm features in raster order of the (h, w) grid.
            global_emb: [B, D] unit-norm global embedding.
            grid: (h, w) with ``h * w == P``.
        """
        x = (images.to(self.mean.dtype) - self.mean) / self.std
        x = self.head(self.blocks(self.stem(x)))
        h, w = x.shape[-2:]
        raw = x.flatten(2).transpose(1, 2)
        return F.normalize(raw, dim=-1), F.normalize(raw.mean(1), dim=-1), (h, w)
