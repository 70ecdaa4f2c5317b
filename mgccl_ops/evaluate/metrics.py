"""Mean intersection-over-union from a confusion matrix accumulated over a split."""

from __future__ import annotations

import torch


class ConfusionMatrix:
    """Accumulates ``matrix[target, prediction]`` pixel counts over a data split.

    Args:
        num_classes: C; labels outside 0..C-1 in the target (e.g. 255) are ignored.
    """

    def __init__(self, num_classes: int):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: prediction and target int64 of one shape (e.g. [B, H, W])."""
        if prediction.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(prediction.shape)} != target shape {tuple(target.shape)}")
        c = self.num_classes
        prediction, target = prediction.cpu(), target.cpu()
        keep = (target >= 0) & (target < c)
        pred = prediction[keep].clamp(0, c - 1)
        true = target[keep]
        self.matrix += torch.bincount(true * c + pred, minlength=c * c).view(c, c)

    def iou(self) -> torch.Tensor:
        """Per-class IoU [C] (float64); NaN for classes absent from both target and prediction."""
        m = self.matrix.double()
        inter = m.diag()
        union = m.sum(0) + m.sum(1) - inter
        return torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))

    def mean_iou(self) -> float:
        """Mean IoU over the classes that occur in the target or the prediction."""
        iou = self.iou()
        valid = ~iou.isnan()
        return float(iou[valid].mean()) if valid.any() else float("nan")
