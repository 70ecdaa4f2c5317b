"""Tiny fixture folders in each benchmark's shipped layout (see mgccl_ops.data.benchmarks)."""

from pathlib import Path

import numpy as np
from PIL import Image

# The stored ids each fixture mask draws from (besides 255): a few valid ids per benchmark.
STORED_IDS = {
    "voc": [0, 1, 15, 20],
    "voc20": [0, 1, 15, 20],
    "context60": [0, 3, 59],
    "context59": [0, 3, 59],
    "coco_object": [0, 1, 80],
    "coco_stuff": [0, 90, 170],
    "cityscapes": [0, 7, 26, 33],
    "ade20k": [0, 1, 150],
}


def stored_mask(benchmark: str, seed: int, shape: tuple[int, int]) -> np.ndarray:
    """A uint8 mask of blocks of the benchmark's stored ids, with a few 255 pixels."""
    rng = np.random.default_rng(seed)
    ids = np.array(STORED_IDS[benchmark] + [255], dtype=np.uint8)
    blocks = rng.integers(0, len(ids), ((shape[0] + 3) // 4, (shape[1] + 3) // 4))
    return np.kron(ids[blocks], np.ones((4, 4), dtype=np.uint8))[: shape[0], : shape[1]]


def save_mask(path: Path, mask: np.ndarray, palette: bool = False) -> None:
    img = Image.fromarray(mask)
    if palette:  # a grey image given a palette becomes a palette image with the same indices
        img.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def save_image(path: Path, seed: int, shape: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*shape, 3), dtype=np.uint8)).save(path)


def build(root: Path, benchmark: str, shapes=((12, 16), (20, 14))) -> list[np.ndarray]:
    """Write one split of ``benchmark`` under ``root`` in its shipped layout; returns the
    stored masks in the reader's order (sorted ids)."""
    masks = [stored_mask(benchmark, i, s) for i, s in enumerate(shapes)]
    ids = [f"img{i}" for i in range(len(shapes))]
    if benchmark in ("voc", "voc20", "context60", "context59"):
        voc = benchmark.startswith("voc")
        mask_dir = "SegmentationClass" if voc else "SegmentationClassContext"
        split_dir = "ImageSets/Segmentation" if voc else "ImageSets/SegmentationContext"
        for i, (sid, m) in enumerate(zip(ids, masks, strict=True)):
            save_image(root / "JPEGImages" / f"{sid}.jpg", i, m.shape)
            save_mask(root / mask_dir / f"{sid}.png", m, palette=voc)
        (root / split_dir).mkdir(parents=True)
        (root / split_dir / "val.txt").write_text("\n".join(ids) + "\n")
    elif benchmark in ("coco_object", "coco_stuff"):
        suffix = "_instanceTrainIds.png" if benchmark == "coco_object" else "_labelTrainIds.png"
        for i, (sid, m) in enumerate(zip(ids, masks, strict=True)):
            save_image(root / "images/val2017" / f"{sid}.jpg", i, m.shape)
            save_mask(root / "annotations/val2017" / f"{sid}{suffix}", m)
    elif benchmark == "cityscapes":
        for i, m in enumerate(masks):
            city = ("aachen", "bochum")[i % 2]
            stem = f"{city}_{i:06d}_000019"
            save_image(root / "leftImg8bit/val" / city / f"{stem}_leftImg8bit.png", i, m.shape)
            save_mask(root / "gtFine/val" / city / f"{stem}_gtFine_labelIds.png", m)
    elif benchmark == "ade20k":
        for i, (sid, m) in enumerate(zip(ids, masks, strict=True)):
            save_image(root / "images/validation" / f"ADE_val_{sid}.jpg", i, m.shape)
            save_mask(root / "annotations/validation" / f"ADE_val_{sid}.png", m)
    else:
        raise ValueError(benchmark)
    return masks
