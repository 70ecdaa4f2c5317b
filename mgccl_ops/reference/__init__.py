"""Plain-PyTorch references of every op: the specification in code, used by tests and benchmarks.

Each function has the signature of its fused twin in ``mgccl_ops`` and materialises whatever
it needs (the N x M logits included).
"""

from mgccl_ops.reference.contrastive import contrastive_loss
from mgccl_ops.reference.mining import hard_negative_loss, topk_hard_negatives
from mgccl_ops.reference.multi_grained import multi_grained_loss

__all__ = [
    "contrastive_loss",
    "hard_negative_loss",
    "multi_grained_loss",
    "topk_hard_negatives",
]
