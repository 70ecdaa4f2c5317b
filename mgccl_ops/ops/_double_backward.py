"""Refusal of second-order gradients through the fused losses.

The fused losses compute their gradients inside the kernels (saved from the forward or
recomputed by a ``*_backward`` op); those gradients are not themselves differentiable. Rather
than return a second-order gradient that silently misses terms (zero, say), a backward run
with ``create_graph=True`` raises, and so does differentiating a ``*_backward`` op called
directly.
"""

from __future__ import annotations

import torch


def message(op: str) -> str:
    return (
        f"{op}: double backward is not supported by {op}: its gradients come from a fused kernel "
        "that is not itself differentiable (backward was asked to build a graph, e.g. "
        f"create_graph=True). For higher-order gradients use mgccl_ops.reference.{op}."
    )


def refuse_if_building_graph(op: str) -> None:
    """Called first in an op's backward: autograd enables grad mode there only when it is
    asked to record a graph of the backward (``create_graph=True``)."""
    if torch.is_grad_enabled():
        raise RuntimeError(message(op))


def register_refusing_autograd(backward_op: str, op: str) -> None:
    """Registers an autograd formula for the internal op ``mgccl::<backward_op>`` whose backward
    raises :func:`message`, so that autograd never warns that it has no formula, and never lets a
    gradient of it pass as zero."""

    def backward(ctx, *grads):
        raise RuntimeError(message(op))

    torch.library.register_autograd(f"mgccl::{backward_op}", backward)
