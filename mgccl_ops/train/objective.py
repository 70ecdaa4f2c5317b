"""The three-level MGCCL objective (object, part, pixel) of DESIGN.md, on any op backend."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ObjectiveConfig:
    """Weights and knobs of the objective.

    Attributes:
        object_weight, part_weight, pixel_weight: level weights; a zero weight skips the
            level (``part_weight = pixel_weight = 0`` is the object-level-only ablation).
        part_tau: temperature of the entity-to-pixel attention that pools part regions.
        pixel_bound: pixels whose best cosine similarity to their caption's entities is
            below this are ignored by the pixel level.
        pixel_margin: a pixel may take entity j as pseudo label only if its similarity to
            j is within this margin of the best similarity any pixel of the image has to j
            (j's region). Pixels in no entity's region (background a caption does not name,
            mostly) take the learned background key as positive when one is given, else they
            are ignored; either way they are not pulled toward some object.
        hard_negatives: negatives mined per part / pixel row.
    """

    object_weight: float = 1.0
    part_weight: float = 0.5
    pixel_weight: float = 0.5
    part_tau: float = 0.1
    pixel_bound: float = 0.2
    pixel_margin: float = 0.3
    hard_negatives: int = 8


def entity_bank_index(entity_ids: torch.Tensor) -> torch.Tensor:
    """Row of each (image, slot) entity in the flattened bank, or -1 for empty slots.

    Args:
        entity_ids: int64 [B, E], phrase id of each slot (-1 = empty).

    Returns:
        int64 [B, E]: bank rows numbered in (image, slot) raster order.
    """
    valid = entity_ids >= 0
    rows = torch.cumsum(valid.flatten(), 0).view_as(entity_ids) - 1
    return torch.where(valid, rows, torch.full_like(rows, -1))


def mgccl_loss(
    ops: ModuleType,
    dense: torch.Tensor,
    global_emb: torch.Tensor,
    caption_emb: torch.Tensor,
    phrase_emb: torch.Tensor,
    entity_ids: torch.Tensor,
    logit_scale: torch.Tensor,
    cfg: ObjectiveConfig,
    background_emb: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its detached parts for one batch.

    Args:
        ops: the op backend (see :func:`mgccl_ops.train.backend.get_ops`).
        dense: [B, P, D] unit-norm dense image features.
        global_emb: [B, D] unit-norm global image embeddings.
        caption_emb: [B, D] unit-norm caption embeddings.
        phrase_emb: [U, D] unit-norm embeddings of the batch's distinct entity phrases.
        entity_ids: int64 [B, E], which phrase fills each entity slot of each caption
            (-1 = empty); equal ids mean equal phrase text, the hard-negative group.
        logit_scale: 0-dim log of the contrastive scale (learnable).
        cfg: weights and knobs.
        background_emb: optional [D] learned embedding of unnamed background, appended to
            the entity bank as one more key (its own group): the positive of pixels outside
            every entity's region and a negative for everything else. It keeps background
            features away from object phrases, so a score threshold finds background.

    Returns:
        ``(total, parts)`` with parts ``object``, ``part``, ``pixel`` (levels that run).
    """
    b, p, d = dense.shape
    scale = logit_scale.exp().clamp(max=100.0)
    parts: dict[str, torch.Tensor] = {}
    total = dense.new_zeros(())
    if cfg.object_weight:
        pos = torch.arange(b, device=dense.device)
        parts["object"] = ops.contrastive_loss(global_emb, caption_emb, pos, scale, symmetric=True)
        total = total + cfg.object_weight * parts["object"]
    if not (cfg.part_weight or cfg.pixel_weight) or not bool((entity_ids >= 0).any()):
        return total, parts

    valid = entity_ids >= 0
    slots = phrase_emb[entity_ids.clamp(min=0)]  # [B, E, D]
    bank = slots[valid]  # [M, D]
    bank_group = entity_ids[valid]  # [M]
    bank_row = entity_bank_index(entity_ids)  # [B, E]
    entity_rows, entity_group = bank.shape[0], bank_group
    if background_emb is not None:
        bank = torch.cat([bank, F.normalize(background_emb, dim=-1).to(bank.dtype)[None]])
        bank_group = torch.cat([bank_group, bank_group.new_full((1,), int(entity_ids.max()) + 1)])
    levels = []
    names = []
    if cfg.part_weight:
        pooled = F.scaled_dot_product_attention(slots, dense, dense, scale=1.0 / cfg.part_tau)
        part_q = F.normalize(pooled, dim=-1)[valid]
        part_pos = torch.arange(entity_rows, device=dense.device)
        levels.append((part_q, part_pos, cfg.part_weight, entity_group))
        names.append("part")
    if cfg.pixel_weight:
        with torch.no_grad():
            sim = torch.einsum("bpd,bed->bpe", dense, slots).masked_fill(~valid[:, None, :], -2.0)
            region = (sim >= sim.amax(1, keepdim=True) - cfg.pixel_margin) & valid[:, None, :]  # [B, P, E]
            best, slot = sim.masked_fill(~region, -2.0).max(-1)  # [B, P]
            pixel_pos = bank_row.gather(1, slot)
            pixel_pos = torch.where(best >= cfg.pixel_bound, pixel_pos, torch.full_like(pixel_pos, -1))
            if background_emb is not None:
                outside = ~region.any(-1)
                pixel_pos = torch.where(outside, torch.full_like(pixel_pos, entity_rows), pixel_pos)
            pixel_pos = pixel_pos.flatten()
            pixel_group = torch.where(pixel_pos >= 0, bank_group[pixel_pos.clamp(min=0)], -1)
        levels.append((dense.reshape(b * p, d), pixel_pos, cfg.pixel_weight, pixel_group))
        names.append("pixel")
    negatives = min(cfg.hard_negatives, bank.shape[0])
    grained, per_level = ops.multi_grained_loss(levels, bank, scale, k_group=bank_group, hard_negatives=negatives)
    for name, value in zip(names, per_level, strict=True):
        parts[name] = value
    return total + grained, parts
