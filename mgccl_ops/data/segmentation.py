"""Segmentation benchmarks stored as PASCAL-VOC-style folders."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .benchmarks import Benchmark, get_benchmark
from .images import IMAGE_EXTENSIONS, decode_image


class SegmentationFolder(torch.utils.data.Dataset):
    """Images and label PNGs laid out like PASCAL VOC::

        root/JPEGImages/<id>.jpg
        root/SegmentationClass/<id>.png       (palette or grey PNG of class indices)
        root/ImageSets/Segmentation/<split>.txt   (one id per line)

    Without the split file every mask in the mask folder is used. Items have ``image``
    uint8 [3, S, S] and ``mask`` int64 [S, S] (classes of the benchmark, 255 = ignore),
    resized to ``size`` (bicubic / nearest) when given. Samples whose image or mask is
    missing or does not decode are skipped and counted in ``skipped`` at construction.

    Raises:
        FileNotFoundError: ``root`` or its image or mask folder does not exist.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        benchmark: str | Benchmark = "voc",
        split: str = "val",
        size: int | None = None,
        image_dir: str = "JPEGImages",
        mask_dir: str = "SegmentationClass",
    ):
        self.root = Path(root)
        self.benchmark = get_benchmark(benchmark) if isinstance(benchmark, str) else benchmark
        self.class_names = list(self.benchmark.class_names)
        self.size = size
        images, masks = self.root / image_dir, self.root / mask_dir
        for folder in (self.root, images, masks):
            if not folder.is_dir():
                raise FileNotFoundError(f"segmentation folder not found: {folder}")
        split_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if split_file.is_file():
            ids = [ln.strip() for ln in split_file.read_text().splitlines() if ln.strip()]
        else:
            ids = sorted(p.stem for p in masks.glob("*.png"))
        self.skipped: Counter = Counter()
        self.items: list[tuple[Path, Path]] = []
        for sample_id in ids:
            image = next(
                (images / (sample_id + e) for e in IMAGE_EXTENSIONS if (images / (sample_id + e)).is_file()),
                None,
            )
            mask = masks / f"{sample_id}.png"
            if image is None or not mask.is_file():
                self.skipped["missing_file"] += 1
            elif not (_decodes(image) and _decodes(mask)):
                self.skipped["corrupt_image"] += 1
            else:
                self.items.append((image, mask))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        image_path, mask_path = self.items[index]
        image = decode_image(str(image_path), self.size)
        with Image.open(mask_path) as m:
            stored = torch.from_numpy(np.asarray(m, dtype=np.int64).copy())
        if stored.ndim == 3:
            stored = stored[..., 0]
        if self.size is not None:
            stored = F.interpolate(stored[None, None].float(), size=(self.size, self.size), mode="nearest")[0, 0].long()
        return {"image": image, "mask": self.benchmark.convert_mask(stored)}


def _decodes(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.load()
        return True
    except (OSError, ValueError, SyntaxError):
        return False
