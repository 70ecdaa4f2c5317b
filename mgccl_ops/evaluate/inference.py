"""mmsegmentation's test-time protocol: short-side resize and sliding-window inference.

The image is resized (bilinear, aspect kept) so that its short side is ``short_side``
unless its long side would then exceed ``max_long_side`` (mmseg's ``Resize`` with
``img_scale=(max_long_side, short_side)``, ``keep_ratio=True``). Windows of ``window`` x
``window`` pixels are placed every ``stride`` pixels, the last row and column flush with
the far edge (mmseg's ``slide_inference``); each window's class logits are upsampled to
the window and the overlapping windows are averaged. The caller upsamples the result to
the original mask size and scores there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def resized_size(height: int, width: int, short_side: int | None, max_long_side: int | None) -> tuple[int, int]:
    """(H', W') after the keep-ratio resize; unchanged when ``short_side`` is None."""
    if not short_side:
        return height, width
    scale = short_side / min(height, width)
    if max_long_side:
        scale = min(scale, max_long_side / max(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def slide_windows(height: int, width: int, window: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Window boxes ``(y0, y1, x0, x1)`` covering an H x W image; a window is cut to the image
    where the image is smaller than it.

    Raises:
        ValueError: ``window`` or ``stride`` below 1, or ``stride > window`` (pixels missed).
    """
    if window < 1 or stride < 1 or stride > window:
        raise ValueError(f"sliding window needs 1 <= stride <= window, got window={window}, stride={stride}")
    rows = max(height - window + stride - 1, 0) // stride + 1
    cols = max(width - window + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        y1 = min(r * stride + window, height)
        y0 = max(y1 - window, 0)
        for c in range(cols):
            x1 = min(c * stride + window, width)
            boxes.append((y0, y1, max(x1 - window, 0), x1))
    return boxes


UnitFn = Callable[[str, torch.Tensor, tuple[int, int], torch.Tensor], torch.Tensor]


def batch_logits(
    model: nn.Module, images: torch.Tensor, units: Sequence[str], unit_fn: UnitFn
) -> dict[str, torch.Tensor]:
    """Each unit's logits [B, T, h, w] of images [B, 3, H, W] (0..255) from one encoder pass.

    ``unit_fn(unit, dense, grid, images)`` maps dense features [B, P, D] on the (h, w) grid
    to a unit's logits (on the grid, or at image size).
    """
    dense, _, grid = model.encode_image(images)
    dense = dense.float()
    return {unit: unit_fn(unit, dense, grid, images) for unit in units}


@torch.no_grad()
def image_logits(
    model: nn.Module,
    image: torch.Tensor,
    units: Sequence[str],
    unit_fn: UnitFn,
    *,
    short_side: int | None,
    max_long_side: int | None,
    window: int | None,
    stride: int | None,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """Each unit's class logits [1, T, H', W'] of one image [3, H, W] (uint8, 0..255) at the
    resized size (H', W'); sliding windows when ``window`` is set, else the whole image."""
    device = model.logit_scale.device
    x = image.to(device=device, dtype=torch.float32)[None]
    size = resized_size(*x.shape[-2:], short_side, max_long_side)
    if size != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    if not window:
        out = batch_logits(model, x, units, unit_fn)
        return {u: F.interpolate(v, size=size, mode="bilinear", align_corners=False) for u, v in out.items()}
    boxes = slide_windows(*size, window, stride or window)
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros(1, 1, *size, device=device)
    for first in range(0, len(boxes), batch_size):
        chunk = boxes[first : first + batch_size]
        crops = torch.cat([x[..., y0:y1, x0:x1] for y0, y1, x0, x1 in chunk])
        out = batch_logits(model, crops, units, unit_fn)
        for unit, logits in out.items():
            logits = F.interpolate(logits, size=crops.shape[-2:], mode="bilinear", align_corners=False)
            total = sums.setdefault(unit, torch.zeros(1, logits.shape[1], *size, device=device))
            for (y0, y1, x0, x1), window_logits in zip(chunk, logits, strict=True):
                total[0, :, y0:y1, x0:x1] += window_logits
        for y0, y1, x0, x1 in chunk:
            count[..., y0:y1, x0:x1] += 1
    return {unit: total / count for unit, total in sums.items()}
