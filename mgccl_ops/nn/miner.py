"""A pytorch-metric-learning style miner built on :func:`mgccl_ops.topk_hard_negatives`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import mgccl_ops

MODULE = "HardNegativeMiner"
OUTPUTS = ("triplets", "pairs")
POSITIVES = ("all", "hardest")


def positive_pairs(labels: torch.Tensor, ref_labels: torch.Tensor, same_set: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (anchor i, positive j) with ``ref_labels[j] == labels[i]`` (and j != i when the
    references are the anchors themselves), anchors ascending, then j ascending.

    Built from the sorted reference labels, in memory O(N + M + pairs): never an N x M mask.
    """
    sorted_labels, order = torch.sort(ref_labels, stable=True)
    start = torch.searchsorted(sorted_labels, labels, side="left")
    count = torch.searchsorted(sorted_labels, labels, side="right") - start
    anchors = torch.repeat_interleave(torch.arange(labels.shape[0], device=labels.device), count)
    first = torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
    rank_in_class = torch.arange(anchors.shape[0], device=labels.device) - first
    positives = order[torch.repeat_interleave(start, count) + rank_in_class]
    if same_set:
        keep = positives != anchors
        anchors, positives = anchors[keep], positives[keep]
    # Order within each anchor by positive index (the sort was stable, so it already is).
    return anchors, positives


class HardNegativeMiner(nn.Module):
    """Mines each anchor's hardest negatives, in the shape pytorch-metric-learning losses take.

    ``miner(embeddings, labels, ref_emb=None, ref_labels=None)`` returns index tuples into
    ``embeddings`` (anchors) and ``ref_emb`` (positives and negatives; ``embeddings`` itself when
    ``ref_emb`` is None), ready for ``loss(embeddings, labels, indices_tuple)``:

    - ``output="triplets"``: ``(anchor, positive, negative)``, one triplet per (anchor, positive,
      mined negative);
    - ``output="pairs"``: ``(anchor1, positive, anchor2, negative)``: the positive pairs and the
      mined negative pairs.

    Negatives of anchor i are its ``num_negatives`` most similar references of another label
    (``topk_hard_negatives`` with the labels as groups; never the N x M similarity matrix),
    after ``skip`` and above no ``max_sim``. Positives are the references of the same label
    (never the anchor itself): all of them, or only the least similar (``positives="hardest"``,
    with ``num_negatives=1`` pytorch-metric-learning's ``BatchHardMiner`` with cosine
    similarity). Anchors lacking a positive or a negative yield no tuple.

    Args:
        num_negatives: negatives per anchor (>= 1).
        output: "triplets" or "pairs".
        positives: "all" or "hardest".
        normalize: compare L2-normalised embeddings (cosine similarity, as pml's default
            distances rank them); False uses raw dot products.
        max_sim: optional bound: references more similar than this are not negatives.
        skip: pass over this many of the hardest negatives (they are often false negatives).
    """

    def __init__(
        self,
        num_negatives: int = 1,
        output: str = "triplets",
        positives: str = "all",
        normalize: bool = True,
        max_sim: float | None = None,
        skip: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 1:
            raise ValueError(f"{MODULE}: num_negatives should be an int >= 1, got {num_negatives!r}")
        if output not in OUTPUTS:
            raise ValueError(f"{MODULE}: output should be one of {OUTPUTS}, got {output!r}")
        if positives not in POSITIVES:
            raise ValueError(f"{MODULE}: positives should be one of {POSITIVES}, got {positives!r}")
        self.num_negatives = num_negatives
        self.output = output
        self.positives = positives
        self.normalize = normalize
        self.max_sim = max_sim
        self.skip = skip

    @torch.no_grad()
    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """embeddings [N, D], labels [N] (any integer dtype), optional ref_emb [M, D] and
        ref_labels [M] -> int64 index tuples (see the class docstring)."""
        if (ref_emb is None) != (ref_labels is None):
            raise ValueError(f"{MODULE}: ref_emb and ref_labels should be given together")
        same_set = ref_emb is None
        ref_emb, ref_labels = (embeddings, labels) if same_set else (ref_emb, ref_labels)
        for name, value, rows in (("labels", labels, embeddings), ("ref_labels", ref_labels, ref_emb)):
            if value.dim() != 1 or value.shape[0] != rows.shape[0]:
                raise ValueError(f"{MODULE}: {name} should be [{rows.shape[0]}], got shape {tuple(value.shape)}")
            if value.is_floating_point() or value.is_complex():
                raise ValueError(f"{MODULE}: {name} should hold integer class labels, got {value.dtype}")
        labels, ref_labels = labels.long(), ref_labels.long()
        q, k = embeddings.detach(), ref_emb.detach()
        if self.normalize:
            q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)

        num = min(self.num_negatives, k.shape[0])
        neg_idx, _ = mgccl_ops.topk_hard_negatives(
            q, k, num, q_group=labels, k_group=ref_labels, max_sim=self.max_sim, skip=self.skip
        )
        anchors, positive = positive_pairs(labels, ref_labels, same_set)
        if self.positives == "hardest" and anchors.numel() > 0:
            anchors, positive = self._hardest(q, k, anchors, positive)
        has_negative = neg_idx[:, 0] >= 0 if num > 0 else torch.zeros_like(labels, dtype=torch.bool)
        keep = has_negative[anchors]
        anchors, positive = anchors[keep], positive[keep]

        neg_anchor = torch.arange(q.shape[0], device=q.device)[:, None].expand_as(neg_idx)
        neg_valid = neg_idx >= 0
        if self.output == "pairs":
            has_positive = torch.zeros_like(has_negative).index_fill_(0, anchors, True)
            neg_valid &= has_positive[:, None]
            return anchors, positive, neg_anchor[neg_valid], neg_idx[neg_valid]
        # Triplets: every (anchor, positive) pair with each of the anchor's mined negatives.
        per_pair = neg_idx[anchors]  # [P, K]
        valid = per_pair >= 0
        counts = valid.sum(1)
        return (
            torch.repeat_interleave(anchors, counts),
            torch.repeat_interleave(positive, counts),
            per_pair[valid],
        )

    @staticmethod
    def _hardest(q, k, anchors, positive):
        """Each anchor's least similar positive (ties: the smaller index)."""
        sim = (q[anchors] * k[positive]).sum(1)
        n = q.shape[0]
        lowest = torch.full((n,), float("inf"), dtype=sim.dtype, device=q.device)
        lowest.scatter_reduce_(0, anchors, sim, reduce="amin")
        is_lowest = sim == lowest[anchors]
        big = torch.iinfo(torch.int64).max
        first = torch.full((n,), big, dtype=torch.int64, device=q.device)
        first.scatter_reduce_(0, anchors[is_lowest], positive[is_lowest], reduce="amin")
        chosen = torch.unique(anchors)
        return chosen, first[chosen]

    def extra_repr(self) -> str:
        return (
            f"num_negatives={self.num_negatives}, output={self.output!r}, positives={self.positives!r}, "
            f"normalize={self.normalize}, max_sim={self.max_sim}, skip={self.skip}"
        )
