"""Typed wrappers of the compiled operators, with their fake impls and autograd."""

from mgccl_ops.ops.contrastive import contrastive_loss
from mgccl_ops.ops.hard_negatives import hard_negative_loss, topk_hard_negatives
from mgccl_ops.ops.multi_grained import multi_grained_loss
from mgccl_ops.ops.region_merge import region_auto_threshold, region_merge
from mgccl_ops.ops.region_pool import region_broadcast, region_pool
from mgccl_ops.ops.semantic_unit import adaptive_semantic_unit
from mgccl_ops.ops.sigmoid_contrastive import sigmoid_contrastive_loss

__all__ = [
    "adaptive_semantic_unit",
    "contrastive_loss",
    "hard_negative_loss",
    "multi_grained_loss",
    "region_auto_threshold",
    "region_broadcast",
    "region_merge",
    "region_pool",
    "sigmoid_contrastive_loss",
    "topk_hard_negatives",
]
