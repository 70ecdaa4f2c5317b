"""Evaluate a model on a segmentation split for each prediction unit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from .inference import batch_logits, image_logits
from .metrics import ConfusionMatrix
from .prompts import TEMPLATES, class_embeddings
from .units import UNITS, adaptive_logits, group_logits, pixel_logits, predict


@dataclass
class EvalSettings:
    """How predictions are made.

    Attributes:
        units: which of ``"pixel"``, ``"group"``, ``"adaptive"`` to score.
        background_threshold: cosine score under which a pixel is background (used only
            when the benchmark has a background class, listed first in its class names);
            one for all units or a ``{unit: threshold}`` dict.
        groups: clusters per image for the per-group unit.
        background_key: where the benchmark has a background class and the model a learned
            background key (``background_emb``), a pixel whose key score beats every class
            is background too, whatever the threshold.
        merge_threshold: ``region_merge`` threshold for the adaptive unit (float or "auto").
        colour_weight: weight of the image colours in the adaptive unit's merge guide
            (see :func:`~mgccl_ops.evaluate.units.adaptive_logits`); 0 merges on the
            features alone, on the feature grid.
        templates: prompt templates for the class names.
        batch_size: images (or sliding windows of one image) per forward pass.
        keep: how many leading images' predictions to return for plotting.
        short_side, max_long_side: resize each image (bilinear, aspect kept) so its short
            side is ``short_side`` unless its long side would exceed ``max_long_side``
            (see :mod:`mgccl_ops.evaluate.inference`); None keeps the image size.
        window, stride: sliding-window inference with ``window`` x ``window`` crops every
            ``stride`` pixels (default ``stride = window``); None for whole-image inference.
        on_prediction: called as ``on_prediction(sample, unit, labels)`` with every
            sample's predicted labels int64 [H, W] (CPU), e.g. to write them to files.

    Predictions are always upsampled to the mask's own (original) size and scored there.
    With ``short_side`` and ``window`` both None the images are encoded in batches of equal
    sizes; otherwise one image at a time.
    """

    units: Sequence[str] = UNITS
    background_threshold: float | dict[str, float] = 0.5
    background_key: bool = True
    groups: int = 8
    merge_threshold: float | str = 0.9
    colour_weight: float = 1.0
    templates: Sequence[str] = TEMPLATES
    batch_size: int = 32
    keep: int = 0
    short_side: int | None = None
    max_long_side: int | None = None
    window: int | None = None
    stride: int | None = None
    on_prediction: Callable[[dict, str, torch.Tensor], None] | None = None


@dataclass
class EvalResult:
    """Per-unit confusion matrices and the first ``keep`` images with their predictions."""

    class_names: list[str]
    matrices: dict[str, ConfusionMatrix]
    images: list[torch.Tensor] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)
    predictions: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def mean_iou(self) -> dict[str, float]:
        """mIoU (0-100) per unit."""
        return {unit: 100 * m.mean_iou() for unit, m in self.matrices.items()}


@torch.no_grad()
def text_bank(
    model: nn.Module, named: Sequence[str], has_background: bool, settings: EvalSettings
) -> tuple[torch.Tensor, bool]:
    """Embeddings [T (+1), D] of the named classes (float32, on the model's device), plus
    the model's background key as a last row when it is used; returns ``(text, keyed)``."""
    text = class_embeddings(model, list(named), settings.templates).float()
    key = getattr(model, "background_emb", None)
    keyed = has_background and settings.background_key and key is not None
    if keyed:
        text = torch.cat([text, F.normalize(key.detach().float().to(text.device), dim=-1)[None]])
    return text, keyed


def unit_logits(
    ops: ModuleType,
    unit: str,
    dense: torch.Tensor,
    grid: tuple[int, int],
    text: torch.Tensor,
    settings: EvalSettings,
    images: torch.Tensor | None = None,
) -> torch.Tensor:
    """Class logits [B, T, h, w] of one unit from dense features [B, P, D] (the adaptive
    unit's are [B, T, H, W] when the images [B, 3, H, W] are given)."""
    if unit == "pixel":
        return pixel_logits(dense, grid, text)
    if unit == "group":
        return group_logits(ops, dense, grid, text, settings.groups)
    if unit == "adaptive":
        return adaptive_logits(ops, dense, grid, text, settings.merge_threshold, images, settings.colour_weight)
    raise ValueError(f"unknown unit {unit!r}; expected one of {UNITS}")


def _same_size_runs(samples: list[dict]) -> list[list[dict]]:
    """Split a chunk into runs of consecutive samples whose images share one size."""
    runs: list[list[dict]] = []
    for sample in samples:
        if runs and runs[-1][0]["image"].shape == sample["image"].shape:
            runs[-1].append(sample)
        else:
            runs.append([sample])
    return runs


def _accumulate(
    result: EvalResult, unit: str, pred: torch.Tensor, samples: list[dict], room: int, settings: EvalSettings
) -> None:
    """Add predictions [B, H, W] of the samples' masks to the unit's matrix; keep ``room`` of them."""
    pred = pred.cpu()
    result.matrices[unit].update(pred, torch.stack([s["mask"] for s in samples]))
    result.predictions[unit] += list(pred[: max(room, 0)])
    if settings.on_prediction is not None:
        for sample, labels in zip(samples, pred, strict=True):
            settings.on_prediction(sample, unit, labels)


def _score(
    model: nn.Module,
    ops: ModuleType,
    samples: list[dict],
    text: torch.Tensor,
    thresholds: dict[str, float | None],
    keyed: bool,
    settings: EvalSettings,
    result: EvalResult,
) -> None:
    """Predict a batch of samples with every unit and accumulate the scores: the batch
    (of one image size) in one pass without the test-time protocol, else one image at a
    time through :func:`~mgccl_ops.evaluate.inference.image_logits`."""

    def logits_of(unit, dense, grid, images):
        return unit_logits(ops, unit, dense, grid, text, settings, images)

    images = [s["image"] for s in samples]
    masks = [s["mask"] for s in samples]
    room = settings.keep - len(result.images)
    result.images += images[: max(room, 0)]
    result.targets += masks[: max(room, 0)]
    if settings.short_side is None and settings.window is None:
        device = model.logit_scale.device
        batch = torch.stack(images).to(device)
        for unit, logits in batch_logits(model, batch, settings.units, logits_of).items():
            pred = predict(logits, tuple(masks[0].shape[-2:]), thresholds[unit], keyed)
            _accumulate(result, unit, pred, samples, room, settings)
        return
    for i, sample in enumerate(samples):
        image, mask = sample["image"], sample["mask"]
        out = image_logits(
            model,
            image,
            settings.units,
            logits_of,
            short_side=settings.short_side,
            max_long_side=settings.max_long_side,
            window=settings.window,
            stride=settings.stride,
            batch_size=settings.batch_size,
        )
        for unit, logits in out.items():
            pred = predict(logits, tuple(mask.shape[-2:]), thresholds[unit], keyed)
            _accumulate(result, unit, pred, [sample], room - i, settings)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    class_names: Sequence[str],
    has_background: bool,
    ops: ModuleType,
    settings: EvalSettings | None = None,
) -> EvalResult:
    """Score every unit over the whole split.

    Args:
        model: ``encode_image`` / ``encode_text`` interface (see ``SmallDualEncoder``).
        dataset: items with ``image`` uint8 [3, H, W] and ``mask`` int64 [H, W] indexing
            ``class_names`` (255 = ignore).
        class_names: the benchmark's classes; with ``has_background`` the first is the
            background, predicted by threshold rather than by its name.
        has_background: whether class 0 is a thresholded background.
        ops: op backend for the region ops.
        settings: prediction settings (defaults if None).
    """
    settings = settings or EvalSettings()
    model.eval()
    named = list(class_names[1:] if has_background else class_names)
    text, keyed = text_bank(model, named, has_background, settings)
    chosen = settings.background_threshold
    thresholds = {
        unit: (chosen[unit] if isinstance(chosen, dict) else chosen) if has_background else None
        for unit in settings.units
    }
    result = EvalResult(list(class_names), {u: ConfusionMatrix(len(class_names)) for u in settings.units})
    result.predictions = {u: [] for u in settings.units}
    loader = torch.utils.data.DataLoader(dataset, batch_size=settings.batch_size, collate_fn=lambda s: s, shuffle=False)
    for chunk in loader:
        for samples in _same_size_runs(chunk):
            _score(model, ops, samples, text, thresholds, keyed, settings, result)
    return result
