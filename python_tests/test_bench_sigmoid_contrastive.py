"""The sigmoid_contrastive_loss benchmark end to end on a tiny size: JSON, Markdown and PNG."""

from __future__ import annotations

import json

import pytest

from mgccl_ops.cli import main


def test_benchmark_writes_its_report(tmp_path):
    pytest.importorskip("open_clip")
    out = tmp_path / "out"
    assert main(["bench", "sigmoid_contrastive", "--sizes", "64", "--dim", "8", "--out", str(out)]) == 0
    rows = json.loads((out / "sigmoid_contrastive.json").read_text())
    assert [r["provider"] for r in rows] == ["torch.mm", "mgccl", "open_clip", "pytorch"]
    assert all(r["time_ms"]["median"] > 0 and r["peak_mem_mib"] is not None for r in rows)
    by_provider = {r["provider"]: r for r in rows}
    assert by_provider["open_clip"]["time_vs_open_clip"] == 1.0
    assert "time_vs_open_clip" in by_provider["mgccl"] and "memory_saving" in by_provider["mgccl"]
    table = (out / "sigmoid_contrastive.md").read_text()
    assert "| mgccl | 64 |" in table and "open_clip peak / peak" in table
    assert (out / "sigmoid_contrastive.png").stat().st_size > 0


def test_materialising_providers_stop_at_their_limit(tmp_path):
    out = tmp_path / "out"
    argv = ["bench", "sigmoid_contrastive", "--sizes", "32", "--dim", "4", "--materialising-max", "16"]
    assert main([*argv, "--providers", "mgccl", "pytorch", "--out", str(out)]) == 0
    rows = json.loads((out / "sigmoid_contrastive.json").read_text())
    assert [r["provider"] for r in rows] == ["mgccl"]
