"""Typed wrappers of the compiled operators, with their fake impls and autograd."""

from mgccl_ops.ops.contrastive import contrastive_loss
from mgccl_ops.ops.hard_negatives import hard_negative_loss, topk_hard_negatives
from mgccl_ops.ops.multi_grained import multi_grained_loss

__all__ = ["contrastive_loss"]
__all__ += ["hard_negative_loss", "multi_grained_loss", "topk_hard_negatives"]
