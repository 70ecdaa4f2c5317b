"""open_clip's ``ClipLoss`` as a drop-in over the fused :func:`mgccl_ops.contrastive_loss`."""

from __future__ import annotations

import torch
from torch import nn

import mgccl_ops
from mgccl_ops.nn._common import check_distributed, rank_and_sizes, scalar_parameter

MODULE = "ClipLoss"


class ClipLoss(nn.Module):
    """CLIP's symmetric contrastive loss with open_clip's constructor and call.

    ``ClipLoss()(image_features, text_features, logit_scale)`` equals open_clip's
    ``open_clip.loss.ClipLoss`` in value and gradients, without the two N x N logits matrices.
    ``logit_scale`` is passed already exponentiated, as open_clip models return it
    (``model.logit_scale.exp()``).

    Args:
        local_loss: with world_size > 1, each rank's loss covers its own rows against the
            gathered batch (open_clip's ``local_loss``); else every rank computes the loss of the
            whole gathered batch.
        gather_with_grad: with world_size > 1, gradients flow through the gathered features of
            the other ranks (open_clip's ``gather_with_grad``); else only the local features get
            gradients.
        cache_labels: accepted for compatibility; no label tensor is built.
        rank, world_size: this process's rank and the number of processes (torch.distributed
            must be initialised with the same when world_size > 1; gathers go through
            ``mgccl_ops.distributed``; local batch sizes may differ between ranks).
        use_horovod: not supported (ValueError).
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
    ) -> None:
        super().__init__()
        check_distributed(MODULE, rank, world_size, use_horovod)
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: float | torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        output_dict: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """image_features [N, D], text_features [N, D], logit_scale (exponentiated) -> the 0-dim
        loss, or ``{"contrastive_loss": loss}`` with ``output_dict``.

        ``logit_bias`` (open_clip accepts one) shifts every logit of a softmax row alike, so it
        leaves the loss unchanged; a tensor bias receives its zero gradient as in open_clip.
        """
        scale = scalar_parameter(MODULE, "logit_scale", logit_scale)
        if image_features.shape != text_features.shape:
            raise ValueError(
                f"{MODULE}: image_features and text_features should have the same shape [N, D], got "
                f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
            )
        if self.world_size > 1:
            loss = self._distributed_loss(image_features, text_features, scale)
        else:
            pos = torch.arange(image_features.shape[0], device=image_features.device)
            loss = mgccl_ops.contrastive_loss(image_features, text_features, pos, scale, symmetric=True)
        if isinstance(logit_bias, torch.Tensor):
            loss = loss + 0.0 * scalar_parameter(MODULE, "logit_bias", logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss

    def _distributed_loss(self, image: torch.Tensor, text: torch.Tensor, scale) -> torch.Tensor:
        """open_clip's gathered loss: both directions against the features of every rank."""
        from mgccl_ops.distributed.comm import all_gather_rows, gather_rows_with_grad

        ring, sizes = rank_and_sizes(MODULE, self.rank, self.world_size, image.shape[0], image.device)
        offset = sum(sizes[: ring.rank])
        if self.gather_with_grad:
            all_image = gather_rows_with_grad(ring, image, sizes)
            all_text = gather_rows_with_grad(ring, text, sizes)
        elif self.local_loss:
            # As open_clip: the gathered features are constants; gradients reach the local
            # features only through their own side of the loss.
            all_image = all_gather_rows(ring, image.detach(), sizes)
            all_text = all_gather_rows(ring, text.detach(), sizes)
        else:
            # As open_clip: the other ranks' rows as constants, this rank's own with gradient.
            def gathered(x):
                rows = all_gather_rows(ring, x.detach(), sizes)
                return torch.cat([rows[:offset], x, rows[offset + x.shape[0] :]])

            all_image, all_text = gathered(image), gathered(text)
        if not self.local_loss:
            pos = torch.arange(all_image.shape[0], device=image.device)
            return mgccl_ops.contrastive_loss(all_image, all_text, pos, scale, symmetric=True)
        pos = torch.arange(offset, offset + image.shape[0], device=image.device)
        image_side = mgccl_ops.contrastive_loss(image, all_text, pos, scale)
        text_side = mgccl_ops.contrastive_loss(text, all_image, pos, scale)
        return (image_side + text_side) / 2
