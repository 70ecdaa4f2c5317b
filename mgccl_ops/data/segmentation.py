"""Segmentation benchmarks read from the folders their data sets ship in (see
:mod:`mgccl_ops.data.benchmarks` for each benchmark's layout)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .benchmarks import Benchmark, get_benchmark
from .images import decode_image

# PIL modes of single-channel class-id PNGs: palette indices and 8-bit grey.
MASK_MODES = ("P", "L")


class SegmentationFolder(torch.utils.data.Dataset):
    """The images and label masks of one split of a benchmark, at their original size.

    Items have ``image`` uint8 [3, H, W], ``mask`` int64 [H, W] (classes of the benchmark,
    255 = ignore; the stored ids converted by :meth:`Benchmark.convert_mask`) and ``name``
    (the mask's path relative to ``root``). Samples whose image or mask is missing or does
    not decode are skipped and counted in ``skipped`` at construction.

    Args:
        root: the benchmark's root folder (e.g. ``VOCdevkit/VOC2012``).
        benchmark: name or :class:`Benchmark`.
        split: split name (a split file's name or a split folder); default the
            benchmark's usual evaluation split.

    Raises:
        FileNotFoundError: ``root``, its image or mask folder, or the split file does not
            exist (the message names the path).
        ValueError: a mask is not a single-channel class-id PNG (e.g. RGB), naming the file;
            a mask holding values that are not class ids raises when that item is read.
    """

    def __init__(self, root: str | os.PathLike, benchmark: str | Benchmark = "voc", split: str | None = None):
        self.root = Path(root)
        self.benchmark = get_benchmark(benchmark) if isinstance(benchmark, str) else benchmark
        self.class_names = list(self.benchmark.class_names)
        layout = self.benchmark.layout
        self.split = split or layout.default_split
        images = self.root / layout.image_dir.format(split=self.split)
        masks = self.root / layout.mask_dir.format(split=self.split)
        for folder in (self.root, images, masks):
            if not folder.is_dir():
                raise FileNotFoundError(f"{self.benchmark.name} folder not found: {folder}")
        if layout.split_file is not None:
            split_file = self.root / layout.split_file.format(split=self.split)
            if not split_file.is_file():
                raise FileNotFoundError(f"{self.benchmark.name} split file not found: {split_file}")
            ids = [ln.strip() for ln in split_file.read_text().splitlines() if ln.strip()]
        else:
            pattern = ("*/*" if layout.nested else "*") + layout.mask_suffix
            found = sorted(str(p.relative_to(masks)) for p in masks.glob(pattern))
            ids = [f[: -len(layout.mask_suffix)] for f in found]
        self.skipped: Counter = Counter()
        self.items: list[tuple[Path, Path]] = []
        for sample_id in ids:
            image = images / (sample_id + layout.image_suffix)
            mask = masks / (sample_id + layout.mask_suffix)
            if not (image.is_file() and mask.is_file()):
                self.skipped["missing_file"] += 1
                continue
            mode = _mask_mode(mask)
            if mode is None or not _decodes(image):
                self.skipped["corrupt_image"] += 1
            else:
                if mode not in MASK_MODES:
                    raise ValueError(
                        f"mask {mask} is a {mode!r} image; {self.benchmark.name} masks must be single-channel "
                        "class ids (a palette or grey PNG), not colours"
                    )
                self.items.append((image, mask))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        image_path, mask_path = self.items[index]
        image = decode_image(str(image_path), None)
        with Image.open(mask_path) as m:
            stored = torch.from_numpy(np.asarray(m, dtype=np.int64).copy())
        if tuple(stored.shape) != tuple(image.shape[-2:]):
            raise ValueError(
                f"mask {mask_path} is {tuple(stored.shape)} but its image {image_path} is {tuple(image.shape[-2:])}"
            )
        mask = self.benchmark.convert_mask(stored, source=f"mask {mask_path}")
        return {"image": image, "mask": mask, "name": str(mask_path.relative_to(self.root))}


def _decodes(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.load()
        return True
    except (OSError, ValueError, SyntaxError):
        return False


def _mask_mode(path: Path) -> str | None:
    """The PIL mode of a mask that decodes, else None."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.mode
    except (OSError, ValueError, SyntaxError):
        return None
