"""Typed wrappers of the compiled operators, with their fake impls and autograd."""

from mgccl_ops.ops.contrastive import contrastive_loss

__all__ = ["contrastive_loss"]
