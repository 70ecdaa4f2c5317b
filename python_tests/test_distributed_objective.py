"""The training objective under DDP equals one process on the concatenated batch.

``mgccl_loss`` (object, part, pixel and background levels, colour refinement, mined hard
negatives or the full softmax) through :class:`mgccl_ops.train.ddp.DistributedOps` on 2 and 4
gloo ranks, each holding its own images, captions and phrases, against the same objective on
the concatenation in one process: the loss, its parts and every parameter gradient (fp64), for
both contrastive modes. Some ranks hold images without entities, and one rank has none at all:
it still takes part in the collectives (before, it returned early and left the others waiting).
"""

from __future__ import annotations

import math

import pytest
import rank_cases
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mgccl_ops.backends import get_ops
from mgccl_ops.train import ddp
from mgccl_ops.train.objective import ObjectiveConfig, mgccl_loss

TOL = {"rtol": 1e-9, "atol": 1e-11}
GRID = (3, 3)
SIDE = 6  # image side: each feature cell covers 2 x 2 pixels
VOCABULARY = 6  # phrase texts "phrase0".."phrase5"
# Per rank, per image: the vocabulary ids of its caption's entities.
SHARDS = {
    2: [[[0, 1], [2], [1, 3, 4]], [[], [0], [5, 2]]],
    4: [[[0, 1], [2, 0]], [[], []], [[3], [1, 5, 0]], [[4], []]],
}


class ObjectiveTowers(nn.Module):
    """Dense and global image features, caption and phrase embeddings from linear maps (fp64),
    a learnable logit scale and background key, and ``mgccl_loss`` on them: the whole step in
    ``forward``, as the trainer hands it to DDP."""

    def __init__(self):
        super().__init__()
        self.pixel = nn.Linear(6, 5)
        self.text = nn.Linear(7, 5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(5.0)))
        self.background_emb = nn.Parameter(torch.linspace(-1.0, 1.0, 5))

    def forward(self, ops, cfg, pixels, rgb, captions, phrases, entity_ids):
        features = self.pixel(pixels)  # [B, P, 5]
        unit = lambda t: F.normalize(t, dim=-1)  # noqa: E731
        dense, global_emb = unit(features), unit(features.mean(1))
        caption_emb, phrase_emb = unit(self.text(captions)), unit(self.text(phrases))
        return mgccl_loss(
            ops, dense, global_emb, caption_emb, phrase_emb, entity_ids, self.logit_scale, cfg,
            self.background_emb, rgb, GRID,
        )  # fmt: skip


def _global_inputs(world: int):
    """Per image: pixel features [P, 6], RGB image [3, SIDE, SIDE], caption features [7];
    the vocabulary's features [V, 7]. The same on every rank."""
    images = sum(len(shard) for shard in SHARDS[world])
    gen = torch.Generator().manual_seed(world)
    pixels = torch.randn(images, GRID[0] * GRID[1], 6, generator=gen, dtype=torch.float64)
    rgb = torch.randint(0, 256, (images, 3, SIDE, SIDE), generator=gen).to(torch.float64)
    captions = torch.randn(images, 7, generator=gen, dtype=torch.float64)
    vocabulary = torch.randn(VOCABULARY, 7, generator=gen, dtype=torch.float64)
    return pixels, rgb, captions, vocabulary


def _phrases_and_ids(entities: list[list[int]]) -> tuple[list[int], torch.Tensor]:
    """The batch's distinct vocabulary ids (first-seen order) and entity_ids [B, E] into them,
    as :func:`mgccl_ops.data.collate_pairs` numbers them."""
    order: dict[int, int] = {}
    width = max((len(e) for e in entities), default=0)
    ids = torch.full((len(entities), width), -1, dtype=torch.int64)
    for row, caption in enumerate(entities):
        for slot, word in enumerate(caption):
            ids[row, slot] = order.setdefault(word, len(order))
    return list(order), ids


def _objective(model, ops, cfg, pixels, rgb, captions, vocabulary, entities):
    words, entity_ids = _phrases_and_ids(entities)
    return model(ops, cfg, pixels, rgb, captions, vocabulary[words], entity_ids)


def _case_objective(rank: int, world: int) -> None:
    pixels, rgb, captions, vocabulary = _global_inputs(world)
    sizes = [len(shard) for shard in SHARDS[world]]
    mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    everything = [caption for shard in SHARDS[world] for caption in shard]
    base = get_ops("fused")
    for negatives in (0, 3):
        cfg = ObjectiveConfig(hard_negatives=negatives, refine_iters=2, pixel_bound=-0.5)
        torch.manual_seed(0)
        reference = ObjectiveTowers().double()
        expected, expected_parts = _objective(reference, base, cfg, pixels, rgb, captions, vocabulary, everything)
        expected.backward()
        assert set(expected_parts) == {"object", "part", "pixel", "background"}
        for mode in ("gather", "ring"):
            torch.manual_seed(0)
            model = DistributedDataParallel(ObjectiveTowers().double(), find_unused_parameters=True)
            phrases = ddp.GlobalPhraseIds(ddp.RunContext(rank, world))
            ops = ddp.DistributedOps(base, phrases, mode)
            words = _phrases_and_ids(SHARDS[world][rank])[0]
            phrases.update([f"phrase{w}" for w in words])
            loss, parts = _objective(
                model, ops, cfg, pixels[mine], rgb[mine], captions[mine], vocabulary, SHARDS[world][rank]
            )
            loss.backward()
            what = f"negatives={negatives} mode={mode} rank={rank}"
            torch.testing.assert_close(loss, expected.detach(), **TOL, msg=lambda m, w=what: f"{w}: loss: {m}")
            assert set(parts) == set(expected_parts), (what, sorted(parts))
            for name, value in parts.items():
                torch.testing.assert_close(value, expected_parts[name].detach(), **TOL)
            for (name, p), q in zip(model.module.named_parameters(), reference.parameters()):
                torch.testing.assert_close(p.grad, q.grad, **TOL, msg=lambda m, w=what, n=name: f"{w}: {n}: {m}")


CASES = {"objective": _case_objective}
CASE_WORLDS = {"objective": (2, 4)}


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_objective_equals_one_process_on_the_concatenated_batch(world, tmp_path_factory):
    rank_cases.run_case(__name__, world, "objective", tmp_path_factory)
