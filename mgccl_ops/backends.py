"""Pick the implementation of the MGCCL ops: the fused extension or the plain-PyTorch reference.

Both the training and the evaluation layer choose their ops here, so the switch sits below
them (beside the ops and their references) rather than inside either.
"""

from __future__ import annotations

import importlib
from types import ModuleType

BACKENDS = ("fused", "reference")


def get_ops(backend: str) -> ModuleType:
    """The module whose functions implement the ops of the public API.

    ``"fused"`` is ``mgccl_ops`` itself (the compiled kernels); ``"reference"`` is
    ``mgccl_ops.reference`` (the same signatures in plain PyTorch, used for comparison).

    Raises:
        ValueError: unknown backend name.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return importlib.import_module("mgccl_ops" if backend == "fused" else "mgccl_ops.reference")
