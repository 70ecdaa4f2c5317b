"""Class-name lists, stored-mask conventions and folder layouts of the usual open-vocabulary
segmentation benchmarks, as their data sets ship or as mmsegmentation's (and GroupViT's)
conversion scripts leave them.

Per benchmark (``root`` is the folder named first; ``{split}`` the split name):

- ``voc`` / ``voc20``: ``VOCdevkit/VOC2012`` as shipped. ``JPEGImages/<id>.jpg``,
  ``SegmentationClass/<id>.png`` (palette PNGs: 0 background, 1..20, 255 ignore), ids from
  ``ImageSets/Segmentation/{split}.txt`` (default ``val``). ``voc20`` drops the background
  (label 0 ignored, 1..20 -> 0..19).
- ``context60`` / ``context59``: ``VOCdevkit/VOC2010`` after mmsegmentation's
  ``tools/dataset_converters/pascal_context.py``. ``JPEGImages/<id>.jpg``,
  ``SegmentationClassContext/<id>.png`` (grey: 0 background, 1..59), ids from
  ``ImageSets/SegmentationContext/{split}.txt``. ``context59`` ignores label 0.
- ``coco_object``: ``coco_stuff164k`` after GroupViT's ``convert_coco_object.py``.
  ``images/{split}/<id>.jpg``, ``annotations/{split}/<id>_instanceTrainIds.png`` (0
  background, 1..80 the things, 255 ignore); split folder default ``val2017``.
- ``coco_stuff``: ``coco_stuff164k`` after mmsegmentation's ``coco_stuff164k.py``.
  ``images/{split}/<id>.jpg``, ``annotations/{split}/<id>_labelTrainIds.png`` (0..170,
  255 ignore); split folder default ``val2017``.
- ``cityscapes``: ``cityscapes`` as shipped. ``leftImg8bit/{split}/<city>/<id>_leftImg8bit.png``,
  ``gtFine/{split}/<city>/<id>_gtFine_labelIds.png`` (the 34 label ids, mapped here to the
  19 train ids; every other id is ignored); split folder default ``val``.
- ``ade20k``: ``ADEChallengeData2016`` as shipped. ``images/{split}/<id>.jpg``,
  ``annotations/{split}/<id>.png`` (0 ignore, 1..150 -> 0..149); split folder default
  ``validation``.

A benchmark either has a background class (listed first, predicted by a score threshold)
or not; ``reduce_zero_label`` benchmarks store an "other" label 0 that is ignored and
shift the rest down by one.
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


# Cityscapes label id -> train id (cityscapesScripts' labels.py); ids not listed are ignored.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                        25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
IGNORE = 255


@dataclass(frozen=True)
class Layout:
    """Where a benchmark's images and masks are under its root folder.

    Attributes:
        image_dir, mask_dir: folders (``{split}`` is replaced by the split name).
        image_suffix, mask_suffix: what follows a sample id in the file names.
        split_file: the list of sample ids (``{split}`` replaced), or None when the split
            is the set of masks found in ``mask_dir`` (searched one level deep when
            ``nested``, e.g. Cityscapes' city folders).
        default_split: the split scored when none is named.
        nested: masks sit in sub-folders of ``mask_dir``, mirrored under ``image_dir``.
    """

    image_dir: str
    mask_dir: str
    image_suffix: str
    mask_suffix: str
    split_file: str | None
    default_split: str
    nested: bool = False


VOC_LAYOUT = Layout("JPEGImages", "SegmentationClass", ".jpg", ".png", "ImageSets/Segmentation/{split}.txt", "val")
CONTEXT_LAYOUT = Layout(
    "JPEGImages", "SegmentationClassContext", ".jpg", ".png", "ImageSets/SegmentationContext/{split}.txt", "val"
)
COCO_OBJECT_LAYOUT = Layout("images/{split}", "annotations/{split}", ".jpg", "_instanceTrainIds.png", None, "val2017")
COCO_STUFF_LAYOUT = Layout("images/{split}", "annotations/{split}", ".jpg", "_labelTrainIds.png", None, "val2017")
CITYSCAPES_LAYOUT = Layout(
    "leftImg8bit/{split}", "gtFine/{split}", "_leftImg8bit.png", "_gtFine_labelIds.png", None, "val", nested=True
)
ADE20K_LAYOUT = Layout("images/{split}", "annotations/{split}", ".jpg", ".png", None, "validation")


@dataclass(frozen=True)
class Benchmark:
    """A benchmark's classes, mask convention and folder layout.

    Attributes:
        name: key in :data:`BENCHMARKS`.
        class_names: evaluated classes; ``"background"`` first when ``has_background``.
        has_background: class 0 is background, predicted by a score threshold.
        layout: where images and masks are (see the module docstring).
        max_stored: the largest label a stored mask may hold besides 255 (ignore).
        reduce_zero_label: stored label 0 is ignored and labels k >= 1 become k - 1.
        id_map: stored label -> evaluation label for masks that store other ids
            (Cityscapes label ids); stored labels not in it are ignored.
    """

    name: str
    class_names: tuple[str, ...]
    has_background: bool
    layout: Layout
    max_stored: int
    reduce_zero_label: bool = False
    id_map: dict[int, int] | None = None

    def convert_mask(self, stored: torch.Tensor, source: str = "mask") -> torch.Tensor:
        """Stored label map (int64 [H, W]) -> evaluation labels (0..C-1, 255 = ignore).

        Raises:
            ValueError: a label above ``max_stored`` (other than 255) or below 0, naming
                ``source`` and the offending values.
        """
        bad = (stored < 0) | ((stored > self.max_stored) & (stored != IGNORE))
        if bool(bad.any()):
            values = sorted(set(stored[bad].unique().tolist()))[:8]
            raise ValueError(
                f"{source}: label values {values} are not {self.name} class ids "
                f"(expected 0..{self.max_stored} or {IGNORE} = ignore)"
            )
        if self.id_map is not None:
            table = torch.full((max(self.max_stored, IGNORE) + 1,), IGNORE, dtype=torch.int64)
            for stored_id, label in self.id_map.items():
                table[stored_id] = label
            return table[stored]
        if self.reduce_zero_label:
            return torch.where((stored == 0) | (stored == IGNORE), IGNORE, stored - 1)
        return stored.clone()


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("voc", ("background",) + VOC_CLASSES, True, VOC_LAYOUT, 20),
        Benchmark("voc20", VOC_CLASSES, False, VOC_LAYOUT, 20, reduce_zero_label=True),
        Benchmark("context60", ("background",) + CONTEXT59_CLASSES, True, CONTEXT_LAYOUT, 59),
        Benchmark("context59", CONTEXT59_CLASSES, False, CONTEXT_LAYOUT, 59, reduce_zero_label=True),
        Benchmark("coco_object", ("background",) + COCO_OBJECT_CLASSES, True, COCO_OBJECT_LAYOUT, 80),
        Benchmark("coco_stuff", COCO_OBJECT_CLASSES + COCO_STUFF_EXTRA, False, COCO_STUFF_LAYOUT, 170),
        Benchmark("cityscapes", CITYSCAPES_CLASSES, False, CITYSCAPES_LAYOUT, 33, id_map=CITYSCAPES_TRAIN_IDS),
        Benchmark("ade20k", ADE20K_CLASSES, False, ADE20K_LAYOUT, 150, reduce_zero_label=True),
    )
}


def get_benchmark(name: str) -> Benchmark:
    """Look a benchmark up by name (``voc``, ``voc20``, ``context59``, ``context60``,
    ``coco_object``, ``coco_stuff``, ``cityscapes``, ``ade20k``)."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}") from None
