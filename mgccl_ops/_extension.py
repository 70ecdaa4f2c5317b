"""Loads the compiled module ``mgccl_ops._C`` and checks that it matches the installed torch.

The module is compiled against one torch release; under another its operators fail to load
with undefined symbols, or worse, load and misbehave. The versions it was built for are
recorded in ``_build_config.py`` at build time and compared here before loading.
"""

from __future__ import annotations

import importlib

import torch

_REBUILD_HINT = (
    "Rebuild mgccl_ops against the installed torch: "
    "pip install --no-build-isolation --force-reinstall --no-deps <path to mgccl_ops>"
)


def _load_compiled_module():
    try:
        build_config = importlib.import_module("mgccl_ops._build_config")
    except ImportError as error:
        raise ImportError(f"mgccl_ops is not built: its compiled module is missing. {_REBUILD_HINT}") from error
    installed_cuda = torch.version.cuda
    if build_config.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"mgccl_ops was built for torch {build_config.TORCH_VERSION} "
            f"(CUDA {build_config.CUDA_VERSION}) but torch {torch.__version__} "
            f"(CUDA {installed_cuda}) is installed. {_REBUILD_HINT}"
        )
    return importlib.import_module("mgccl_ops._C")


_C = _load_compiled_module()


def build_info() -> dict:
    """What the compiled module was built with.

    Returns a dict with ``torch_version``, ``with_cuda``, ``cuda_version``, ``cuda_archs``,
    ``openmp``, ``num_threads`` (at::get_num_threads() now) and ``parallel_info``.
    """
    return dict(_C.build_info())
