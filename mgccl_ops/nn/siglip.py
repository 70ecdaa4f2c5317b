"""open_clip's ``SigLipLoss`` as a drop-in over the fused :func:`mgccl_ops.sigmoid_contrastive_loss`."""

from __future__ import annotations

import torch
from torch import nn

import mgccl_ops
from mgccl_ops.nn._common import check_distributed, rank_and_sizes, scalar_parameter

MODULE = "SigLipLoss"
DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


class SigLipLoss(nn.Module):
    """SigLIP's pairwise-sigmoid loss with open_clip's constructor and call.

    ``SigLipLoss()(image_features, text_features, logit_scale, logit_bias)`` equals
    ``open_clip.loss.SigLipLoss`` in value and gradients, without the N x N logits (and labels).
    ``logit_scale`` is passed exponentiated and ``logit_bias`` as is, as open_clip models return
    them.

    Args:
        cache_labels: accepted for compatibility; no label tensor is built.
        rank, world_size: with world_size > 1 (torch.distributed initialised alike) each rank's
            images also meet every other rank's texts as negatives, as open_clip computes it; the
            texts are gathered with gradient through ``mgccl_ops.distributed`` whatever
            ``dist_impl`` says (open_clip's four exchanges give the same value and gradients).
        dist_impl: one of open_clip's "bidir" (default), "shift", "reduce", "gather".
    """

    def __init__(
        self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl: str | None = None
    ) -> None:
        super().__init__()
        check_distributed(MODULE, rank, world_size)
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in DIST_IMPLS:
            raise ValueError(f"{MODULE}: dist_impl should be one of {DIST_IMPLS} or None, got {dist_impl!r}")

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: float | torch.Tensor,
        logit_bias: float | torch.Tensor,
        output_dict: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """image_features [N, D], text_features [N, D], logit_scale (exponentiated), logit_bias
        -> the 0-dim loss ``-sum_ij log sigmoid(y_ij z_ij) / N``, or ``{"contrastive_loss": loss}``."""
        scale = scalar_parameter(MODULE, "logit_scale", logit_scale)
        bias = 0.0 if logit_bias is None else scalar_parameter(MODULE, "logit_bias", logit_bias)
        if image_features.shape != text_features.shape:
            raise ValueError(
                f"{MODULE}: image_features and text_features should have the same shape [N, D], got "
                f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
            )
        texts = text_features
        if self.world_size > 1:
            texts = self._own_texts_first(image_features, text_features)
        loss = mgccl_ops.sigmoid_contrastive_loss(image_features, texts, scale, bias)
        return {"contrastive_loss": loss} if output_dict else loss

    def _own_texts_first(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """[sum of sizes, D]: this rank's texts (the positives, at j == i), then every other
        rank's (negatives only), gathered with gradient."""
        from mgccl_ops.distributed.comm import gather_rows_with_grad

        ring, sizes = rank_and_sizes(MODULE, self.rank, self.world_size, image.shape[0], image.device)
        if len(set(sizes)) > 1:
            raise ValueError(f"{MODULE}: every rank should pass the same batch size (as open_clip needs), got {sizes}")
        all_text = gather_rows_with_grad(ring, text, sizes)
        offset = sum(sizes[: ring.rank])
        others = torch.cat([all_text[:offset], all_text[offset + text.shape[0] :]])
        return torch.cat([text, others])
