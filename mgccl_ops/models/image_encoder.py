"""A small convolutional dense image encoder (stride 4) that trains on a CPU in minutes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            _conv(channels, channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


def _upsample_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class DenseImageEncoder(nn.Module):
    """Image [B, 3, H, W] -> dense features [B, P, D] and a global embedding [B, D].

    A small U-Net: residual stages at strides 4, 8 and 16, then a top-down path that adds
    each coarser stage, upsampled, to the finer one, ending on the stride-4 grid
    (``P = (H/4) * (W/4)``). The stride-16 stage sees a whole object, which is what tells
    its shape; the stride-4 stage keeps the colour and the position of each cell. A 1x1
    convolution projects to D. The global embedding is the normalised mean of the
    un-normalised dense features, so both live in one space.

    Batch normalisation (rather than group normalisation) makes the shapes learnable within
    a few hundred steps on the built-in data.

    With ``checkpoint_activations`` each stage runs under activation checkpointing while
    training: only the stage outputs are kept for the backward pass and each stage's inner
    activations are recomputed there, which cuts the encoder's share of a training step's
    memory by several times for about a third more encoder compute. (Batch normalisation
    then sees each training batch twice, so its running statistics move a little faster.)

    Args:
        dim: embedding width D.
        width: channels of the stride-4 stage (the stride-8 and -16 stages have 1.5x and 2x).
        checkpoint_activations: recompute stage activations in the backward pass.
    """

    stride = 4

    def __init__(self, dim: int = 64, width: int = 64, checkpoint_activations: bool = False):
        super().__init__()
        self.checkpoint_activations = checkpoint_activations
        mid, deep = width * 3 // 2, width * 2
        half = width // 2
        self.stage4 = nn.Sequential(_conv(3, half, stride=2), _conv(half, width, stride=2), _Residual(width))
        self.stage8 = nn.Sequential(_conv(width, mid, stride=2), _Residual(mid))
        self.stage16 = nn.Sequential(_conv(mid, deep, stride=2), _Residual(deep), _Residual(deep))
        self.lateral16 = nn.Conv2d(deep, mid, 1)
        self.lateral8 = nn.Conv2d(mid, width, 1)
        self.merge8 = _Residual(mid)
        self.merge4 = _Residual(width)
        self.head = nn.Conv2d(width, dim, 1)
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1) * 255, persistent=False)

    def _run(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_activations and self.training and torch.is_grad_enabled():
            return checkpoint(stage, x, use_reentrant=False)
        return stage(x)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Encode uint8 or float images [B, 3, H, W] with values in 0..255.

        Returns:
            dense: [B, P, D] unit-norm features in raster order of the (h, w) grid.
            global_emb: [B, D] unit-norm global embedding.
            grid: (h, w) with ``h * w == P``.
        """
        x = (images.to(self.mean.dtype) - self.mean) / self.std
        s4 = self._run(self.stage4, x)
        s8 = self._run(self.stage8, s4)
        s16 = self._run(self.stage16, s8)
        s8 = self._run(self.merge8, s8 + _upsample_to(self.lateral16(s16), s8))
        s4 = self._run(self.merge4, s4 + _upsample_to(self.lateral8(s8), s4))
        x = self.head(s4)
        h, w = x.shape[-2:]
        raw = x.flatten(2).transpose(1, 2)
        return F.normalize(raw, dim=-1), F.normalize(raw.mean(1), dim=-1), (h, w)
