"""Text embeddings of class names through prompt templates."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a {}.",
    "an image showing a {}.",
    "there is a {} in the picture.",
    "a rendering of a {}.",
    "this is a {}.",
)


@torch.no_grad()
def class_embeddings(
    model: nn.Module, class_names: Sequence[str], templates: Sequence[str] = TEMPLATES
) -> torch.Tensor:
    """Unit-norm class embeddings [T, D]: each class's mean over its filled-in templates.

    Args:
        model: anything with ``encode_text(texts) -> [N, D]``.
        class_names: T names.
        templates: format strings with one ``{}``.
    """
    if not templates:
        raise ValueError("templates must not be empty")
    texts = [t.format(name) for name in class_names for t in templates]
    emb = model.encode_text(texts).float().view(len(class_names), len(templates), -1)
    return F.normalize(F.normalize(emb, dim=-1).mean(1), dim=-1)
