"""PNG grid of image / ground truth / each unit's prediction."""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

IGNORE_COLOUR = (255, 255, 255)


def palette(num_classes: int) -> np.ndarray:
    """uint8 [num_classes, 3] colours: black for class 0, evenly spaced hues for the rest."""
    colours = [(0, 0, 0)]
    for i in range(1, num_classes):
        hue = (i * 0.618034) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.65 + 0.35 * (i % 2), 0.95 - 0.25 * (i % 3 == 0))
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return np.array(colours, dtype=np.uint8)


def colourise(labels: torch.Tensor, colours: np.ndarray) -> np.ndarray:
    """Label map int64 [H, W] -> RGB uint8 [H, W, 3]; labels outside the palette are white."""
    lab = labels.cpu().numpy()
    out = np.full(lab.shape + (3,), IGNORE_COLOUR, dtype=np.uint8)
    known = (lab >= 0) & (lab < len(colours))
    out[known] = colours[lab[known]]
    return out


def save_grid(
    path: str | os.PathLike,
    images: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    predictions: dict[str, Sequence[torch.Tensor]],
    num_classes: int,
    scale: int = 2,
) -> None:
    """Write a PNG with one row per image: the image [3, H, W] uint8, its ground truth and
    each unit's predicted labels [H, W], under a header naming the columns."""
    if not images:
        raise ValueError("save_grid needs at least one image")
    colours = palette(num_classes)
    titles = ["image", "ground truth"] + list(predictions)
    h, w = images[0].shape[-2:]
    h, w = h * scale, w * scale
    header, gap = 14, 2
    canvas = Image.new("RGB", (len(titles) * (w + gap), header + len(images) * (h + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for col, title in enumerate(titles):
        draw.text((col * (w + gap) + 2, 1), title, fill=(0, 0, 0))
    for row, image in enumerate(images):
        cells = [image.permute(1, 2, 0).cpu().numpy(), colourise(targets[row], colours)]
        cells += [colourise(predictions[unit][row], colours) for unit in predictions]
        for col, cell in enumerate(cells):
            tile = Image.fromarray(np.ascontiguousarray(cell)).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (col * (w + gap), header + row * (h + gap)))
    canvas.save(path)
