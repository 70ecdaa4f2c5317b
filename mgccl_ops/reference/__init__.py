"""Plain-PyTorch references of every op: the specification in code, used by tests and benchmarks.

Each function has the signature of its fused twin in ``mgccl_ops`` and materialises whatever
it needs (the N x M logits included).
"""

from mgccl_ops.reference.contrastive import contrastive_loss

__all__ = ["contrastive_loss"]
