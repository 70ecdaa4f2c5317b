"""One MGCCL forward pass: encode a batch and evaluate the objective."""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from .objective import ObjectiveConfig, mgccl_loss


def batch_loss(
    model: nn.Module, batch: dict, ops: ModuleType, cfg: ObjectiveConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of a batch from :func:`mgccl_ops.data.collate_pairs` (see ``mgccl_loss``)."""
    device = model.logit_scale.device
    images = batch["images"].to(device)
    dense, global_emb, grid = model.encode_image(images)
    texts = batch["captions"] + batch["phrases"]
    text_emb = model.encode_text(texts)
    b = len(batch["captions"])
    dtype = dense.dtype
    return mgccl_loss(
        ops,
        dense,
        global_emb,
        text_emb[:b].to(dtype),
        text_emb[b:].to(dtype),
        batch["entity_ids"].to(device),
        model.logit_scale,
        cfg,
        getattr(model, "background_emb", None),
        images,
        grid,
    )
