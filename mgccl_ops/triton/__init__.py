"""Triton kernels of the similarity family, registered as kernels of the existing ``mgccl::`` ops.

Each module here (one per op family) exposes Python functions with exactly the argument list
and return tuple of the ``torch.ops.mgccl.<op>`` schema (csrc/mgccl_ops.cpp), and a list
``AOT_CONFIGS`` of every kernel configuration it can launch (``scripts/check_triton_aot.py``
compiles them for sm_80 and sm_90). ``KERNELS`` maps an op to ``"module:function"``; adding an
op is one line there.

:func:`register` (called by ``import mgccl_ops``) attaches them with
``torch.library.register_kernel``, so the typed wrappers, fake impls and autograd of
``mgccl_ops.ops`` serve them unchanged:

- ``MGCCL_GPU_KERNELS`` = ``"triton"`` (default) registers them for CUDA tensors, replacing the
  CUDA C++ kernels; ``"cuda"`` keeps the CUDA C++ kernels. Where ``triton`` cannot be imported,
  nothing is registered.
- ``MGCCL_TRITON_ON_CPU=1`` (with ``TRITON_INTERPRET=1``, both set before ``import mgccl_ops``)
  registers them for CPU tensors too, in place of the C++ CPU kernels: the whole public API then
  runs on the Triton interpreter. This is how the kernels are tested without a GPU.

What the interpreter cannot check: it runs the programs of a grid one after another (races
between programs cannot show), it computes bf16/fp16 ``tl.dot`` and bf16 arithmetic wrongly
(the kernels upcast their 16-bit operands to fp32 there, so the 16-bit tensor-core paths run
only on a GPU), and it ignores ``input_precision`` (TF32). Those paths are covered by the GPU
tests (``pytest -m gpu``) and, for compilation, register use and spills, by the AOT check.
"""

from __future__ import annotations

import importlib
import os

import torch

# op name in the mgccl namespace -> "module:function" implementing its schema.
KERNELS = {
    "contrastive_loss": "mgccl_ops.triton.contrastive:contrastive_loss",
    "contrastive_loss_backward": "mgccl_ops.triton.contrastive:contrastive_loss_backward",
    "topk_hard_negatives": "mgccl_ops.triton.topk_hard_negatives:topk_hard_negatives",
    "hard_negative_loss": "mgccl_ops.triton.hard_negative_loss:hard_negative_loss",
    "hard_negative_loss_backward": "mgccl_ops.triton.hard_negative_loss:hard_negative_loss_backward",
    "sigmoid_contrastive_loss": "mgccl_ops.triton.sigmoid_contrastive:sigmoid_contrastive_loss",
}

PROVIDERS = ("triton", "cuda")
_registered: list[str] = []


def triton_available() -> bool:
    """Whether the ``triton`` package imports here."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def gpu_provider() -> str:
    """The GPU kernel provider chosen by ``MGCCL_GPU_KERNELS`` ("triton" by default, or "cuda")."""
    provider = os.environ.get("MGCCL_GPU_KERNELS", "triton")
    if provider not in PROVIDERS:
        raise ValueError(f"MGCCL_GPU_KERNELS should be one of {PROVIDERS}, got {provider!r}")
    return provider


def on_cpu() -> bool:
    """Whether the Triton kernels also serve CPU tensors (``MGCCL_TRITON_ON_CPU=1``)."""
    if os.environ.get("MGCCL_TRITON_ON_CPU", "0") != "1":
        return False
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "MGCCL_TRITON_ON_CPU=1 runs the Triton kernels on CPU tensors through the interpreter: "
            f"set TRITON_INTERPRET=1 too (before importing mgccl_ops), got {os.environ.get('TRITON_INTERPRET')!r}"
        )
    return True


def modules() -> list[str]:
    """The kernel modules named in ``KERNELS``, each once, in table order."""
    return list(dict.fromkeys(target.split(":")[0] for target in KERNELS.values()))


def register() -> list[str]:
    """Registers the ``KERNELS`` for the devices the environment asks for; returns those ops.

    Idempotent: a second call registers nothing more. Returns [] where triton is absent or
    ``MGCCL_GPU_KERNELS=cuda`` and Triton should not serve CPU tensors either.
    """
    if _registered or not triton_available():
        return list(_registered)
    devices = [] if gpu_provider() == "cuda" else ["cuda"]
    if on_cpu():
        devices.append("cpu")
    if not devices:
        return []
    for op, target in KERNELS.items():
        module_name, function_name = target.split(":")
        function = getattr(importlib.import_module(module_name), function_name)
        torch.library.register_kernel(f"mgccl::{op}", devices, function)
        _registered.append(op)
    return list(_registered)


def registered() -> list[str]:
    """The ops whose kernels :func:`register` attached in this process."""
    return list(_registered)
