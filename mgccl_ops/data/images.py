"""Decoding and resizing of images for the readers."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def decode_image(data: bytes | str, size: int | None) -> torch.Tensor:
    """Decode an image file (bytes or path) to RGB uint8 [3, H, W], resized to ``size`` x
    ``size`` (bicubic) when given. Raises ``OSError`` / ``ValueError`` on corrupt data."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    with Image.open(source) as img:
        img = img.convert("RGB")
        if size is not None:
            img = img.resize((size, size), Image.BICUBIC)
        array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
