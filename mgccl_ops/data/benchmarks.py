"""Class-name lists and label conventions of the usual open-vocabulary segmentation benchmarks.

Masks are read as stored by the common conversions (palette or grey PNGs of class indices,
255 = ignore). A benchmark either has a background class (listed first, predicted by a score
threshold) or not; ``reduce_zero_label`` benchmarks store an "other" label 0 that is ignored
and shift the rest down by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa",
    "train", "tv monitor",
)  # fmt: skip
CONTEXT59_CLASSES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book",
    "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth",
    "computer", "cow", "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food",
    "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse",
    "person", "plate", "platform", "potted plant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck",
    "tv monitor", "wall", "water", "window", "wood",
)  # fmt: skip
COCO_OBJECT_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)  # fmt: skip
COCO_STUFF_EXTRA = (
    "banner", "blanket", "branch", "bridge", "building", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling", "ceiling tile", "cloth", "clothes", "clouds", "counter",
    "cupboard", "curtain", "desk", "dirt", "door", "fence", "marble floor", "floor",
    "stone floor", "tile floor", "wood floor", "flower", "fog", "food", "fruit", "furniture",
    "grass", "gravel", "ground", "hill", "house", "leaves", "light", "mat", "metal",
    "mirror", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow",
    "plant", "plastic", "platform", "playingfield", "railing", "railroad", "river", "road",
    "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky", "skyscraper", "snow",
    "solid", "stairs", "stone", "straw", "structural", "table", "tent", "textile", "towel",
    "tree", "vegetable", "brick wall", "concrete wall", "wall", "panel wall", "stone wall",
    "tile wall", "wood wall", "water", "waterdrops", "window blind", "window", "wood",
)  # fmt: skip
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea",
    "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe",
    "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator",
    "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door",
    "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt",
    "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan",
    "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)  # fmt: skip


@dataclass(frozen=True)
class Benchmark:
    """A benchmark's classes and mask convention.

    Attributes:
        name: key in :data:`BENCHMARKS`.
        class_names: evaluated classes; ``"background"`` first when ``has_background``.
        has_background: class 0 is background, predicted by a score threshold.
        reduce_zero_label: stored label 0 is ignored and labels k >= 1 become k - 1.
    """

    name: str
    class_names: tuple[str, ...]
    has_background: bool
    reduce_zero_label: bool = False

    def convert_mask(self, stored: torch.Tensor) -> torch.Tensor:
        """Stored label map (int64 [H, W]) -> evaluation labels (0..C-1, 255 = ignore)."""
        labels = stored.clone()
        if self.reduce_zero_label:
            labels = torch.where(stored == 0, 255, stored - 1)
            labels[stored == 255] = 255
        labels[(labels < 0) | (labels >= len(self.class_names))] = 255
        return labels


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("voc", ("background",) + VOC_CLASSES, True),
        Benchmark("voc20", VOC_CLASSES, False, reduce_zero_label=True),
        Benchmark("context60", ("background",) + CONTEXT59_CLASSES, True),
        Benchmark("context59", CONTEXT59_CLASSES, False, reduce_zero_label=True),
        Benchmark("coco_object", ("background",) + COCO_OBJECT_CLASSES, True),
        Benchmark("coco_stuff", COCO_OBJECT_CLASSES + COCO_STUFF_EXTRA, False),
        Benchmark("cityscapes", CITYSCAPES_CLASSES, False),
        Benchmark("ade20k", ADE20K_CLASSES, False, reduce_zero_label=True),
    )
}


def get_benchmark(name: str) -> Benchmark:
    """Look a benchmark up by name (``voc``, ``voc20``, ``context59``, ``context60``,
    ``coco_object``, ``coco_stuff``, ``cityscapes``, ``ade20k``)."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}") from None
