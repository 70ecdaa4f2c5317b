"""Plain-PyTorch references of every op: the specification in code, used by tests and benchmarks.

Each function has the signature of its fused twin in ``mgccl_ops`` and materialises whatever
it needs (the N x M logits included).
"""

from mgccl_ops.reference.contrastive import contrastive_loss
from mgccl_ops.reference.mining import hard_negative_loss, topk_hard_negatives
from mgccl_ops.reference.multi_grained import multi_grained_loss
from mgccl_ops.reference.regions import (
    adaptive_semantic_unit,
    region_auto_threshold,
    region_broadcast,
    region_merge,
    region_pool,
)
from mgccl_ops.reference.sigmoid_contrastive import sigmoid_contrastive_loss

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
