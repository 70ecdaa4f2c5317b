"""Triton kernels of the similarity family, registered as kernels of the ``mgccl::`` ops.

``KERNELS`` maps each op to the ``module:function`` that implements it with exactly the op's
schema. :func:`register` attaches them as the CUDA kernels (unless ``MGCCL_GPU_KERNELS=cuda``)
and, with ``MGCCL_TRITON_ON_CPU=1`` (and ``TRITON_INTERPRET=1``), as the CPU kernels too, so the
whole public API runs on Triton's interpreter.
"""

from __future__ import annotations

import importlib
import os

import torch

KERNELS = {
    "topk_hard_negatives": "mgccl_ops.triton.topk_hard_negatives:topk_hard_negatives",
    "hard_negative_loss": "mgccl_ops.triton.hard_negative_loss:hard_negative_loss",
    "hard_negative_loss_backward": "mgccl_ops.triton.hard_negative_loss:hard_negative_loss_backward",
}


def _devices() -> list[str]:
    devices = []
    if os.environ.get("MGCCL_GPU_KERNELS", "triton") != "cuda":
        devices.append("cuda")
    if os.environ.get("MGCCL_TRITON_ON_CPU") == "1":
        devices.append("cpu")
    return devices


def register() -> None:
    """Attaches every kernel of ``KERNELS`` to its op for the devices the environment asks for."""
    devices = _devices()
    if not devices:
        return
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    for op, target in KERNELS.items():
        module_name, function_name = target.split(":")
        module = importlib.import_module(module_name)
        torch.library.register_kernel(f"mgccl::{op}", devices, getattr(module, function_name))
