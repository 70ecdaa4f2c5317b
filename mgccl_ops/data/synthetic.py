"""Procedural image-caption data with hidden segmentation masks, deterministic from a seed.

Every sample is drawn by its own generator seeded with ``(seed, split, index)``, so a sample
depends only on those three numbers, never on the order in which samples are read. An image
holds one to three objects (a colour and a shape each) on a two-tone textured background;
its caption names the objects (and sometimes the background) through varied templates, and
its entity phrases are the noun phrases the caption names ("red circle", "striped
background"). The ground-truth mask is for evaluation only.

The colour-shape combinations are split in two: ``train`` and ``val`` images use only the
seen combinations, ``heldout`` images only the unseen ones, so the held-out split tests
whether names never paired in training are segmented (open vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 215),
    "yellow": (235, 205, 30),
    "purple": (135, 50, 185),
    "orange": (245, 135, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
BACKGROUNDS: tuple[str, ...] = ("striped", "checkered", "dotted", "noisy", "wavy", "plain")
_MUTED_TONES = np.array(
    [[128, 128, 128], [96, 90, 84], [160, 150, 130], [70, 78, 90], [120, 110, 95], [180, 178, 172]],
    dtype=np.float32,
)
# Rotations that make a square sit on an edge and a triangle and a star point up (y is down).
_BASE_ANGLE = {"square": np.pi / 4, "triangle": -np.pi / 2, "star": -np.pi / 2}
_SPLITS = {"train": 0, "val": 1, "heldout": 2}
_SIZE_WORDS = ("small", "large", "big", "little")


def combo_name(colour: str, shape: str) -> str:
    """The phrase and class name of a colour-shape combination, e.g. ``"red circle"``."""
    return f"{colour} {shape}"


def all_combos() -> list[tuple[str, str]]:
    """All (colour, shape) pairs, colour-major; index ``i`` is global class id ``i + 1``."""
    return [(c, s) for c in COLOURS for s in SHAPES]


def is_heldout(colour: str, shape: str) -> bool:
    """Whether a combination is unseen in training: two diagonals of the colour x shape grid.

    Every colour and every shape keeps four seen partners, so each word is learned, and
    the held-out pairs (two per colour, two per shape) need both words to be told apart.
    """
    ci = list(COLOURS).index(colour)
    si = SHAPES.index(shape)
    return (si - ci) % len(SHAPES) in (0, 3)


def split_combos(split: str) -> list[tuple[str, str]]:
    """The combinations drawn in a split (``heldout``: unseen ones; else the seen ones)."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    want_heldout = split == "heldout"
    return [(c, s) for c, s in all_combos() if is_heldout(c, s) == want_heldout]


def vocabulary_words() -> list[str]:
    """Every word the captions, phrases and prompt templates of this data set can use."""
    words = set(COLOURS) | set(SHAPES) | set(BACKGROUNDS) | set(_SIZE_WORDS)
    for template in _TEMPLATES_ALL:
        words |= set(template.replace("{objs}", " ").replace("{bg}", " ").split())
    for text in _RELATIONS.values():
        words |= set(text.split())
    words |= {"a", "an", "and", "background", "photo", "of", "the", "with", "there", "is", "shape"}
    words |= {"picture", "image", "rendering", "this", "showing", "coloured", "that"}
    return sorted({w.strip(".,!") for w in words} - {""})


_TEMPLATES_OBJ = (
    "a photo of {objs}.",
    "{objs}.",
    "an image showing {objs}.",
    "there is {objs} in the picture.",
    "this is {objs}.",
    "a rendering of {objs}.",
)
_TEMPLATES_BG = (
    "{objs} on a {bg} background.",
    "a picture of {objs} over a {bg} background.",
    "a {bg} background with {objs}.",
    "{objs} in front of a {bg} background.",
)
_TEMPLATES_ALL = _TEMPLATES_OBJ + _TEMPLATES_BG
_RELATIONS = {
    "left": "to the left of",
    "right": "to the right of",
    "above": "above",
    "below": "below",
}


@dataclass(frozen=True)
class Sample:
    """One procedural sample.

    Attributes:
        image: uint8 array [H, W, 3].
        caption: the caption text.
        entities: the entity phrases the caption names, in caption order.
        mask: int64 array [H, W]; 0 is background, ``k >= 1`` is global combination
            ``k - 1`` of :func:`all_combos`.
    """

    image: np.ndarray
    caption: str
    entities: list[str]
    mask: np.ndarray


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """Boolean mask [H, W] of a shape centred at the origin of the offsets ``dy, dx``."""
    dist = np.hypot(dy, dx)
    theta = np.arctan2(dy, dx) - angle - _BASE_ANGLE.get(shape, 0.0)
    if shape == "circle":
        return dist <= radius
    if shape == "ring":
        return (dist <= radius) & (dist >= 0.55 * radius)
    if shape in ("square", "triangle"):
        sides = 4 if shape == "square" else 3
        sector = 2 * np.pi / sides
        edge = radius * np.cos(np.pi / sides) / np.cos(np.mod(theta, sector) - np.pi / sides)
        return dist <= edge
    if shape == "star":
        sector = 2 * np.pi / 5
        frac = np.abs(np.mod(theta, sector) / sector - 0.5) * 2
        return dist <= radius * (0.45 + 0.55 * frac)
    if shape == "cross":
        c, s = np.cos(angle), np.sin(angle)
        u, v = np.abs(dx * c + dy * s), np.abs(-dx * s + dy * c)
        arm = 0.34 * radius
        return ((u <= radius) & (v <= arm)) | ((v <= radius) & (u <= arm))
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, kind: str, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Float image [H, W, 3] of a two-tone texture of the given kind."""
    tone = _MUTED_TONES[rng.integers(len(_MUTED_TONES))] + rng.uniform(-12, 12, 3)
    other = tone + rng.choice([-1.0, 1.0]) * rng.uniform(30, 55)
    size = yy.shape[0]
    if kind == "striped":
        a = rng.uniform(0, np.pi)
        period = rng.uniform(6, 14)
        pattern = np.sin((xx * np.cos(a) + yy * np.sin(a)) * 2 * np.pi / period) > 0
    elif kind == "checkered":
        cell = rng.integers(6, 14)
        pattern = ((yy // cell + xx // cell) % 2).astype(bool)
    elif kind == "dotted":
        cell = rng.uniform(8, 14)
        py, px = np.mod(yy, cell) - cell / 2, np.mod(xx, cell) - cell / 2
        pattern = np.hypot(py, px) < cell * rng.uniform(0.2, 0.32)
    elif kind == "noisy":
        grid = rng.uniform(0, 1, (size // 8 + 2, size // 8 + 2))
        pattern = grid[(yy // 8).astype(int), (xx // 8).astype(int)] > 0.5
    elif kind == "wavy":
        f1, f2 = rng.uniform(0.25, 0.5), rng.uniform(0.08, 0.16)
        pattern = np.sin(yy * f1 + 3 * np.sin(xx * f2)) > 0
    else:
        pattern = np.zeros_like(yy, dtype=bool)
    return np.where(pattern[..., None], other, tone)


def _relation(a: tuple[float, float], b: tuple[float, float]) -> str:
    """Spatial word for object centre ``a`` relative to ``b`` (both (y, x))."""
    dy, dx = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def render_sample(seed: int, split: str, index: int, size: int = 96) -> Sample:
    """Draw sample ``index`` of ``split`` for ``seed``; a pure function of its arguments."""
    combos = split_combos(split)
    rng = np.random.default_rng([seed, _SPLITS[split], index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    bg_kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    image = _background(rng, bg_kind, yy, xx)
    mask = np.zeros((size, size), dtype=np.int64)
    global_ids = {combo: i + 1 for i, combo in enumerate(all_combos())}

    count = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    chosen = [combos[i] for i in rng.choice(len(combos), size=count, replace=False)]
    centres: list[tuple[float, float]] = []
    placed: list[tuple[str, str]] = []
    for colour, shape in chosen:
        for _ in range(20):
            radius = rng.uniform(0.13, 0.22) * size
            cy, cx = rng.uniform(radius, size - radius, 2)
            if all(np.hypot(cy - y, cx - x) > radius + 0.12 * size for y, x in centres):
                break
        else:
            continue
        box = np.s_[
            max(int(cy - radius) - 1, 0) : int(cy + radius) + 2,
            max(int(cx - radius) - 1, 0) : int(cx + radius) + 2,
        ]
        dy, dx = yy[box] - cy, xx[box] - cx
        body = _shape_mask(shape, dy, dx, radius, rng.uniform(-0.35, 0.35))
        rgb = np.array(COLOURS[colour], dtype=np.float32) + rng.uniform(-18, 18, 3)
        shade = 1.0 + 0.12 * (dy * rng.uniform(-1, 1) + dx * rng.uniform(-1, 1)) / radius
        image[box] = np.where(body[..., None], rgb * shade[..., None], image[box])
        mask[box][body] = global_ids[(colour, shape)]
        centres.append((cy, cx))
        placed.append((colour, shape))

    image = image + rng.normal(0, 6, image.shape).astype(np.float32)
    image = np.clip(image, 0, 255).astype(np.uint8)
    caption, entities = _caption(rng, placed, centres, bg_kind)
    return Sample(image=image, caption=caption, entities=entities, mask=mask)


def _caption(
    rng: np.random.Generator,
    objects: list[tuple[str, str]],
    centres: list[tuple[float, float]],
    bg_kind: str,
) -> tuple[str, list[str]]:
    """Caption text and its entity phrases for the placed objects."""
    phrases = [combo_name(c, s) for c, s in objects]
    spoken = []
    for colour, shape in objects:
        if rng.uniform() < 0.15:
            spoken.append(f"{shape} coloured {colour}")
        elif rng.uniform() < 0.2:
            spoken.append(f"{_SIZE_WORDS[rng.integers(len(_SIZE_WORDS))]} {colour} {shape}")
        else:
            spoken.append(combo_name(colour, shape))
    spoken = [_article(p) for p in spoken]
    if len(spoken) == 2 and rng.uniform() < 0.35:
        objs = f"{spoken[0]} {_RELATIONS[_relation(centres[0], centres[1])]} {spoken[1]}"
    elif len(spoken) >= 2:
        objs = ", ".join(spoken[:-1]) + " and " + spoken[-1]
    else:
        objs = spoken[0]
    name_bg = rng.uniform() < 0.3
    templates = _TEMPLATES_BG if name_bg else _TEMPLATES_OBJ
    caption = templates[rng.integers(len(templates))].format(objs=objs, bg=bg_kind)
    entities = phrases + ([f"{bg_kind} background"] if name_bg else [])
    return caption, entities


class SyntheticShapes(torch.utils.data.Dataset):
    """Map-style data set of procedural samples (see the module docstring).

    Items are dicts with ``image`` uint8 [3, H, W], ``caption`` str, ``entities`` list[str]
    and ``mask`` int64 [H, W] holding indices into :attr:`class_names` (0 = background).
    ``class_names`` lists the benchmark classes of the split: ``"background"`` then the
    split's combinations.
    """

    def __init__(self, split: str = "train", num_samples: int = 10000, seed: int = 0, size: int = 96):
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.split = split
        self.num_samples = num_samples
        self.seed = seed
        self.size = size
        combos = split_combos(split)
        self.class_names = ["background"] + [combo_name(c, s) for c, s in combos]
        self._global_to_local = np.zeros(len(all_combos()) + 1, dtype=np.int64)
        for local, combo in enumerate(combos, start=1):
            self._global_to_local[all_combos().index(combo) + 1] = local

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        sample = render_sample(self.seed, self.split, index, self.size)
        return {
            "image": torch.from_numpy(sample.image).permute(2, 0, 1).contiguous(),
            "caption": sample.caption,
            "entities": sample.entities,
            "mask": torch.from_numpy(self._global_to_local[sample.mask]),
        }
