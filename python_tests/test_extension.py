"""The compiled module: build information and the torch-version guard."""

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
    with pytest.raises(ImportError, match=r"built for torch .* but torch 0\.0\.1 .* is installed\. Rebuild"):
        _extension._load_compiled_module()
