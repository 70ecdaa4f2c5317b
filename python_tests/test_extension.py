"""The compiled module: build information and the torch-version guard."""

import sys
from pathlib import Path

import pytest
import torch

import mgccl_ops
from mgccl_ops import _extension


def test_build_info_records_versions():
    info = mgccl_ops.build_info()
    assert info["torch_version"] == torch.__version__
    assert info["openmp"] is True
    assert info["num_threads"] >= 1
    assert isinstance(info["with_cuda"], bool)
    if info["with_cuda"]:
        assert info["cuda_version"] and info["cuda_archs"]


def test_import_under_another_torch_gives_actionable_error(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    with pytest.raises(ImportError, match=r"built for torch .* but torch 0\.0\.1 .* is installed") as error:
        _extension._load_compiled_module()
    message = str(error.value)
    assert f"built for torch {_extension.importlib.import_module('mgccl_ops._build_config').TORCH_VERSION}" in message
    command = _extension.rebuild_command()
    assert message.endswith(f"Rebuild it against the installed torch with: {command}")
    assert command.startswith(f"{sys.executable} -m pip install --no-build-isolation --no-deps --force-reinstall ")
    # From this checkout the command names it, so it can be pasted as is.
    repo = Path(_extension.__file__).resolve().parents[1]
    if (repo / "CMakeLists.txt").is_file():
        assert command.split()[-1] == str(repo)
