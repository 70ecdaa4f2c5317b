"""Choose the background threshold of each unit on a validation split."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch
from torch import nn

from .evaluator import EvalSettings, text_bank, unit_logits
from .metrics import ConfusionMatrix
from .units import predict


@torch.no_grad()
def calibrate_background(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    class_names: Sequence[str],
    ops: ModuleType,
    settings: EvalSettings,
    candidates: Sequence[float] = tuple(x / 20 for x in range(2, 19)),
) -> dict[str, float]:
    """Per unit, the candidate background threshold with the best mIoU on ``dataset``.

    The data set must have a background class (``class_names[0]``) and should not be the
    test split: the threshold is a hyper-parameter chosen on validation data. Returns
    ``{unit: threshold}`` for ``settings.units``.
    """
    text, keyed = text_bank(model, class_names[1:], True, settings)
    matrices = {u: [ConfusionMatrix(len(class_names)) for _ in candidates] for u in settings.units}
    loader = torch.utils.data.DataLoader(dataset, batch_size=settings.batch_size, collate_fn=lambda s: s)
    for samples in loader:
        images = torch.stack([s["image"] for s in samples])
        masks = torch.stack([s["mask"] for s in samples])
        dense, _, grid = model.encode_image(images.to(model.logit_scale.device))
        dense = dense.float()
        for unit in settings.units:
            logits = unit_logits(ops, unit, dense, grid, text, settings, images)
            for matrix, threshold in zip(matrices[unit], candidates, strict=True):
                matrix.update(predict(logits, tuple(masks.shape[-2:]), threshold, keyed), masks)
    return {
        unit: candidates[max(range(len(candidates)), key=lambda i: ms[i].mean_iou())] for unit, ms in matrices.items()
    }
