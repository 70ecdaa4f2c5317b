"""Scores on the built-in held-out split, with background thresholds chosen on its validation split."""

from __future__ import annotations

from dataclasses import replace
from types import ModuleType

from torch import nn

from ..data.synthetic import SyntheticShapes
from .calibrate import calibrate_background
from .evaluator import EvalResult, EvalSettings, evaluate


def synthetic_scores(
    model: nn.Module,
    settings: EvalSettings,
    ops: ModuleType,
    *,
    eval_images: int,
    val_images: int,
    seed: int = 0,
    threshold: float | None = None,
    background_key: bool = True,
) -> tuple[dict[str, EvalResult], dict[str, float]]:
    """Evaluate on the built-in held-out split (colour-shape pairs never seen in training).

    Each unit's background threshold is calibrated on ``val_images`` images of the validation
    split unless ``threshold`` is given. ``background_key=False`` finds background by the
    threshold alone, for a model whose background key was never trained (the object-level-only
    ablation). The held-out split is drawn with ``seed + 1``, the validation split with ``seed + 2``.

    Returns:
        ``({unit: result}, {unit: background threshold})``; one result serves every unit.
    """
    settings = replace(settings, background_key=background_key)
    held = SyntheticShapes("heldout", eval_images, seed=seed + 1)
    if threshold is None:
        val = SyntheticShapes("val", val_images, seed=seed + 2)
        thresholds = calibrate_background(model, val, val.class_names, ops, settings)
    else:
        thresholds = dict.fromkeys(settings.units, threshold)
    settings.background_threshold = thresholds
    result = evaluate(model, held, held.class_names, True, ops, settings)
    return dict.fromkeys(settings.units, result), thresholds
