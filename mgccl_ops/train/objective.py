"""The three-level MGCCL objective (object, part, pixel) of DESIGN.md, on any op backend."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from .refine import colour_affinity, propagate


@dataclass(frozen=True)
class ObjectiveConfig:
    """Weights and knobs of the objective.

    Attributes:
        object_weight, part_weight, pixel_weight: level weights; a zero weight skips the
            level (``part_weight = pixel_weight = 0`` is the object-level-only ablation).
        background_weight: weight of the pixels whose pseudo label is the learned
            background key. They form a level of their own, so that the many background
            pixels do not drown the object pixels in one mean.
        part_tau: temperature of the entity-to-pixel attention that pools part regions.
        pixel_bound: a pixel whose cosine similarity to the entity it is labelled with is
            below this is ignored by the pixel level (DESIGN's confidence bound).
        refine_iters: colour-affinity propagation steps applied to the pixel label scores
            (:mod:`mgccl_ops.train.refine`); 0 turns refinement off.
        refine_tau: colour distance scale of that propagation (RGB in 0..1).
        hard_negatives: negatives mined per part / pixel row; 0 uses the full softmax
            over the whole entity bank instead of mined negatives.
    """

    object_weight: float = 1.0
    part_weight: float = 0.5
    pixel_weight: float = 1.0
    background_weight: float = 0.5
    part_tau: float = 0.1
    pixel_bound: float = 0.2
    refine_iters: int = 10
    refine_tau: float = 0.05
    hard_negatives: int = 32

    def __post_init__(self):
        if isinstance(self.hard_negatives, bool) or not isinstance(self.hard_negatives, int) or self.hard_negatives < 0:
            raise ValueError(f"hard_negatives must be an int >= 0 (0 = full softmax), got {self.hard_negatives!r}")


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
    images: torch.Tensor | None = None,
    grid: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its detached parts for one batch.

    Args:
        ops: the op backend (see :func:`mgccl_ops.backends.get_ops`).
        dense: [B, P, D] unit-norm dense image features.
        global_emb: [B, D] unit-norm global image embeddings.
        caption_emb: [B, D] unit-norm caption embeddings.
        phrase_emb: [U, D] unit-norm embeddings of the batch's distinct entity phrases.
        entity_ids: int64 [B, E], which phrase fills each entity slot of each caption
            (-1 = empty); equal ids mean equal phrase text, the hard-negative group.
        logit_scale: 0-dim log of the contrastive scale (learnable).
        cfg: weights and knobs.
        background_emb: optional [D] learned embedding of unnamed background, appended to
            the entity bank as one more key (its own group): it competes with a caption's
            entities for the pixel labels, is the positive of the pixels it wins and a
            negative for everything else, so background features stay away from object
            phrases and evaluation can tell background from objects.
        images: [B, 3, H, W] (0..255), for the colour refinement of the pixel labels.
        grid: (h, w) of the dense feature grid, ``h * w == P``.

    Returns:
        ``(total, parts)`` with parts ``object``, ``part``, ``pixel``, ``background``
        (the levels that run).
    """
    b, p, d = dense.shape
    scale = logit_scale.exp().clamp(max=100.0)
    parts: dict[str, torch.Tensor] = {}
    total = dense.new_zeros(())
    if cfg.object_weight:
        pos = torch.arange(b, device=dense.device)
        parts["object"] = ops.contrastive_loss(global_emb, caption_emb, pos, scale, symmetric=True)
        total = total + cfg.object_weight * parts["object"]
    # Ops that run across ranks (``collective``) are called on every rank, entities or not:
    # the other ranks wait for this one in their collectives.
    collective = getattr(ops, "collective", False)
    if not (cfg.part_weight or cfg.pixel_weight) or not (collective or bool((entity_ids >= 0).any())):
        return total, parts

    valid = entity_ids >= 0
    slots = torch.cat([phrase_emb, phrase_emb.new_zeros((1, d))])[entity_ids]  # [B, E, D]; empty slots (-1) get 0
    bank = slots[valid]  # [M, D]
    bank_group = entity_ids[valid]  # [M]
    bank_row = entity_bank_index(entity_ids)  # [B, E]
    entity_rows, entity_group = bank.shape[0], bank_group
    if background_emb is not None:
        bank = torch.cat([bank, F.normalize(background_emb, dim=-1).to(bank.dtype)[None]])
        # Its own group: the id after the batch's phrases (0..U-1).
        bank_group = torch.cat([bank_group, bank_group.new_full((1,), phrase_emb.shape[0])])
    levels = []
    names = []
    if cfg.part_weight:
        pooled = F.scaled_dot_product_attention(slots, dense, dense, scale=1.0 / cfg.part_tau)
        part_q = F.normalize(pooled, dim=-1)[valid]
        part_pos = torch.arange(entity_rows, device=dense.device)
        levels.append((part_q, part_pos, cfg.part_weight, entity_group))
        names.append("part")
    if cfg.pixel_weight:
        pixel_pos = pixel_pseudo_labels(dense, slots, valid, bank_row, bank[entity_rows:], scale, cfg, images, grid)
        pixel_group = torch.cat([bank_group, bank_group.new_full((1,), -1)])[pixel_pos]  # pos -1 -> group -1
        pixels = dense.reshape(b * p, d)
        on_entity = (pixel_pos >= 0) & (pixel_pos < entity_rows)
        levels.append((pixels[on_entity], pixel_pos[on_entity], cfg.pixel_weight, pixel_group[on_entity]))
        names.append("pixel")
        if background_emb is not None and cfg.background_weight:
            on_background = pixel_pos == entity_rows
            levels.append(
                (pixels[on_background], pixel_pos[on_background], cfg.background_weight, pixel_group[on_background])
            )
            names.append("background")
    # 0 hard negatives: the full softmax over the bank (mining 0 would leave only the positive,
    # a loss of 0). The op mines min(K, M) over the bank it sees (the global one across ranks).
    negatives = cfg.hard_negatives or None
    grained, per_level = ops.multi_grained_loss(levels, bank, scale, k_group=bank_group, hard_negatives=negatives)
    for name, value in zip(names, per_level, strict=True):
        parts[name] = value
    return total + grained, parts


@torch.no_grad()
def pixel_pseudo_labels(
    dense: torch.Tensor,
    slots: torch.Tensor,
    valid: torch.Tensor,
    bank_row: torch.Tensor,
    background: torch.Tensor,
    scale: torch.Tensor,
    cfg: ObjectiveConfig,
    images: torch.Tensor | None,
    grid: tuple[int, int] | None,
) -> torch.Tensor:
    """The pixel level's positive key of every pixel: int64 [B * P] (-1 = ignored).

    Each pixel's candidates are its own caption's entities and, when the model has one,
    the background key (bank row ``M_entities``, right after the entity rows). Their
    softmax scores at the contrastive scale are propagated along the image's colour edges
    (``cfg.refine_iters`` steps, when ``images`` and ``grid`` are given) and the best one
    is the label. A pixel labelled with an entity it is less similar to than
    ``cfg.pixel_bound`` is ignored.

    Args:
        dense: [B, P, D] unit-norm pixel features.
        slots: [B, E, D] each caption's entity embeddings; valid: bool [B, E].
        bank_row: int64 [B, E], the bank row of each entity slot.
        background: [0, D] or [1, D], the background key if any.
        scale: 0-dim contrastive scale.
        images: [B, 3, H, W] (0..255) for the refinement, or None.
        grid: (h, w) of the feature grid, h * w = P.
    """
    if slots.shape[1] == 0:  # no entity in the batch: every pixel is background, or ignored without one
        fill = 0 if background.shape[0] else -1
        return torch.full((dense.shape[0] * dense.shape[1],), fill, dtype=torch.int64, device=dense.device)
    sim = torch.einsum("bpd,bed->bpe", dense, slots).float().masked_fill(~valid[:, None, :], -2.0)
    scores = torch.cat([sim, (dense @ background.T).float()], -1)  # [B, P, E (+1)]
    if images is not None and grid is not None and cfg.refine_iters:
        # Empty slots get no probability, so a pixel's label does not depend on how many slots
        # the batch pads to; a pixel without any candidate gets all 0 (not NaN).
        candidate = scores > -2.0
        logits = (scale.float() * scores).masked_fill(~candidate, float("-inf"))
        prob = torch.softmax(logits, -1).masked_fill(~candidate, 0.0)
        prob = propagate(prob, colour_affinity(images, grid, cfg.refine_tau), grid, cfg.refine_iters)
        choice = prob.masked_fill(~candidate, -1.0).argmax(-1)
    else:
        choice = scores.argmax(-1)
    entities = sim.shape[-1]
    slot = choice.clamp(max=entities - 1)
    pos = bank_row.gather(1, slot)
    confident = sim.gather(-1, slot[..., None])[..., 0] >= cfg.pixel_bound
    pos = torch.where(confident, pos, torch.full_like(pos, -1))
    background_row = valid.sum()  # the row after the entity rows, as a tensor: no device sync
    pos = torch.where(choice == entities, background_row, pos)
    return pos.flatten()
