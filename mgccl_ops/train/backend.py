"""Pick the implementation of the MGCCL ops: the fused extension or the plain-PyTorch reference."""

from __future__ import annotations

import importlib
from types import ModuleType

BACKENDS = ("fused", "reference")


def get_ops(backend: str) -> ModuleType:
    """The module whose functions implement the ops of the public API.

    ``"fused"`` is ``mgccl_ops`` itself (the compiled kernels); ``"reference"`` is
    ``mgccl_ops.reference`` (the same signatures in plain PyTorch, used for comparison).
    """
    if backend == "fused":
        return importlib.import_module("mgccl_ops")
    if backend == "reference":
        return importlib.import_module("mgccl_ops.reference")
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
