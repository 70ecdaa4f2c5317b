"""Loads the compiled module ``mgccl_ops._C`` and checks that it matches the installed torch.

The module is compiled against one torch release; under another its operators fail to load
with undefined symbols, or worse, load and misbehave. The versions it was built for are
recorded in ``_build_config.py`` at build time and compared here before loading.
"""

from __future__ import annotations

import importlib
import shlex
import sys
from pathlib import Path

import torch


def rebuild_command() -> str:
    """The exact command that rebuilds the compiled module against the torch of this Python.

    From a source checkout (the package sits next to CMakeLists.txt) it names that checkout; an
    installed wheel has no sources, so the command names the source tree to fetch. Either way it
    builds without isolation, against the installed torch, and leaves other packages alone.
    """
    package_dir = Path(__file__).resolve().parent
    source = package_dir.parent if (package_dir.parent / "CMakeLists.txt").is_file() else None
    target = shlex.quote(str(source)) if source else "<the mgccl_ops source tree or sdist>"
    return f"{shlex.quote(sys.executable)} -m pip install --no-build-isolation --no-deps --force-reinstall {target}"


def _load_compiled_module():
    try:
        build_config = importlib.import_module("mgccl_ops._build_config")
    except ImportError as error:
        raise ImportError(
            f"mgccl_ops is not built: its compiled module is missing. Build it with: {rebuild_command()}"
        ) from error
    installed_cuda = torch.version.cuda
    if build_config.TORCH_VERSION != torch.__version__:
        built_cuda = f"CUDA {build_config.CUDA_VERSION}" if build_config.CUDA_VERSION else "CPU only"
        raise ImportError(
            f"mgccl_ops was built for torch {build_config.TORCH_VERSION} ({built_cuda}) but torch "
            f"{torch.__version__} (CUDA {installed_cuda}) is installed in {sys.executable}. "
            f"Rebuild it against the installed torch with: {rebuild_command()}"
        )
    return importlib.import_module("mgccl_ops._C")


_C = _load_compiled_module()


def build_info() -> dict:
    """What the compiled module was built with.

    Returns a dict with ``torch_version``, ``with_cuda``, ``cuda_version``, ``cuda_archs``,
    ``openmp``, ``num_threads`` (at::get_num_threads() now) and ``parallel_info``.
    """
    return dict(_C.build_info())
