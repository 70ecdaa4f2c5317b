"""Pick the implementation of the MGCCL ops: the fused extension or the plain-PyTorch reference."""

from __future__ import annotations

import importlib
from types import ModuleType

BACKENDS = ("fused", "reference")
# The ops the training and evaluation layer calls.
REQUIRED_OPS = ("contrastive_loss", "multi_grained_loss", "region_pool", "region_broadcast", "adaptive_semantic_unit")


def get_ops(backend: str) -> ModuleType:
    """The module whose functions implement the ops of the public API.

    ``"fused"`` is ``mgccl_ops`` itself (the compiled kernels); ``"reference"`` is
    ``mgccl_ops.reference`` (the same signatures in plain PyTorch, used for comparison).

    Raises:
        ValueError: unknown backend name.
        RuntimeError: the module lacks one of the ops the layer calls.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    module = importlib.import_module("mgccl_ops" if backend == "fused" else "mgccl_ops.reference")
    missing = [name for name in REQUIRED_OPS if not hasattr(module, name)]
    if missing:
        raise RuntimeError(
            f"backend {backend!r} ({module.__name__}) lacks {', '.join(missing)}; "
            "this build of mgccl_ops does not provide them yet, use backend 'reference'"
        )
    return module
