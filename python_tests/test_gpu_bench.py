"""The GPU benchmarks' code paths that run without a GPU: roofline arithmetic, each provider's
step (on the CPU, tiny sizes; providers of one benchmark must compute the same thing), and a
whole run with the CUDA measurement replaced by a stub, down to the written reports."""

from __future__ import annotations

import json

import pytest
import torch

import mgccl_ops
from mgccl_ops import reference
from mgccl_ops.bench import cli, gpu_common, gpu_contrastive, gpu_mining, gpu_multi_grained
from mgccl_ops.bench.multi_grained import plain_hard_negative_loss


def test_roofline_of_the_contrastive_step_at_32k():
    n, d = 32768, 512
    line = gpu_common.roofline(
        gpu_contrastive.flops(n, d, "loss"), gpu_contrastive.bytes_moved(n, d, "bfloat16", "loss")
    )
    assert line["flops"] == 6 * n * n * d
    assert line["compute_ms"] == pytest.approx(6 * n * n * d / 790e12 * 1e3)
    assert line["compute_ms"] == pytest.approx(4.175, abs=1e-3)
    assert line["bytes"] == 6 * n * d * 2
    assert line["memory_ms"] == pytest.approx(6 * n * d * 2 / 4.3e12 * 1e3)
    assert line["bound"] == "compute" and line["floor_ms"] == line["compute_ms"]


def test_roofline_of_mining_and_the_multi_grained_step():
    n, d = 32768, 512
    mining = gpu_mining.roofline(n, d, 128, "bfloat16")
    assert mining["flops"] == 2 * n * n * d and mining["bytes"] == 2 * n * d * 2 + n * 128 * 12
    full = gpu_multi_grained.roofline(n, n, d, 0, "bfloat16")
    hard = gpu_multi_grained.roofline(n, n, d, 32, "bfloat16")
    assert full["flops"] == 6 * n * n * d
    assert hard["flops"] == 2 * n * n * d + 6 * n * 33 * d
    assert hard["floor_ms"] < full["floor_ms"]


def test_contrastive_providers_compute_the_same_clip_loss_on_the_cpu():
    pytest.importorskip("open_clip")  # an optional dependency (absent in the torch 2.13 CI job)
    n, d = 24, 16
    losses = {}
    for provider in ("mgccl (Triton)", "pytorch", "open_clip"):
        q, k, logit_scale = gpu_contrastive.features(n, d, "float32", "cpu")
        losses[provider] = gpu_contrastive.loss_fn(provider, n, "cpu")(q, k, logit_scale.exp()).detach()
    torch.testing.assert_close(losses["mgccl (Triton)"], losses["pytorch"])
    torch.testing.assert_close(losses["mgccl (Triton)"], losses["open_clip"])
    for provider in ("mgccl (Triton)", "pytorch", "open_clip", "torch.mm"):
        gpu_contrastive.step_factory(provider, n, d, "float32", "cpu")()()  # forward + backward runs


def test_mining_providers_agree_on_the_cpu():
    mgccl_idx, _ = gpu_mining.step_factory("mgccl", 50, 8, 5, "float32", "cpu")()()
    topk = gpu_mining.step_factory("torch.mm + topk", 50, 8, 5, "float32", "cpu")()()
    assert torch.equal(mgccl_idx, topk.indices)


@pytest.mark.parametrize("hard_negatives", [0, 4])
def test_multi_grained_providers_agree_on_the_cpu(hard_negatives):
    levels, k, k_group, logit_scale = gpu_multi_grained.inputs(4, 16, "float32", "cpu")
    negatives = hard_negatives or None
    fused = mgccl_ops.multi_grained_loss(levels, k, 2.0, k_group=k_group, hard_negatives=negatives)
    if negatives is None:
        plain = reference.multi_grained_loss(levels, k, 2.0, k_group=k_group)[0]
    else:
        plain = plain_hard_negative_loss(levels, k, 2.0, k_group, negatives)
    torch.testing.assert_close(fused[0], plain, rtol=1e-5, atol=1e-5)
    for provider in gpu_multi_grained.PROVIDERS:
        gpu_multi_grained.step_factory(provider, 4, 16, "float32", hard_negatives, "cpu")()()


def fake_measure(factory, device, *, repeats):
    step = factory()
    step()
    return {"time_ms": {"median": 2.0, "p20": 1.5, "p80": 2.5, "runs": repeats}, "peak_mem_mib": 3.0}


@pytest.mark.parametrize(
    ("name", "argv"),
    [
        ("gpu_contrastive", ["--sizes", "16", "512", "--dims", "8", "--dtypes", "float32", "--float32-max", "512",
                             "--providers", "mgccl (Triton)", "pytorch", "open_clip", "torch.mm"]),
        ("gpu_mining", ["--sizes", "32", "--nums", "4", "--dim", "8", "--dtypes", "float32",
                        "--providers", "mgccl", "torch.mm + topk"]),
        ("gpu_multi_grained", ["--batches", "2", "16", "--dim", "8", "--hard-negatives", "0", "3",
                               "--dtypes", "float32"]),
    ],
)  # fmt: skip
def test_a_whole_run_writes_its_report(tmp_path, monkeypatch, name, argv):
    """The CUDA measurement stubbed (the steps still run, on the CPU); a provider predicted not to
    fit is skipped and named so in the report."""
    if "open_clip" in argv:
        pytest.importorskip("open_clip")  # an optional dependency (absent in the torch 2.13 CI job)
    monkeypatch.setattr(gpu_common, "measure", fake_measure)
    monkeypatch.setattr(gpu_common, "device_memory_bytes", lambda device: 2**21)  # a 2 MiB "device"
    args = cli.build_parser().parse_args([name, *argv, "--device", "cpu", "--out", str(tmp_path)])
    rows = cli.importlib.import_module(cli.BENCHMARKS[name]).run(args)
    written = json.loads((tmp_path / f"{name}.json").read_text())
    assert len(written) == len(rows) > 0
    measured = [row for row in written if "time_ms" in row]
    assert measured, "every case was skipped"
    for row in measured:
        assert row["percent_of_floor"] == pytest.approx(100 * row["floor_ms"] / 2.0)
    markdown = (tmp_path / f"{name}.md").read_text()
    assert "Roofline of" in markdown and "TFLOP/s" in markdown
    assert (tmp_path / f"{name}.png").is_file()
    if name != "gpu_mining":  # the materialising providers do not fit a 2 MiB device at the larger size
        assert any(row.get("skipped") == "skipped: would not fit" for row in written)


def test_a_spent_budget_lists_the_cases_not_run(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_common, "measure", fake_measure)
    monkeypatch.setattr(gpu_common, "device_memory_bytes", lambda device: 2**40)
    argv = ["gpu_mining", "--sizes", "32", "--nums", "4", "--dim", "8", "--dtypes", "float32",
            "--providers", "mgccl", "--time-budget", "0", "--device", "cpu", "--out", str(tmp_path)]  # fmt: skip
    args = cli.build_parser().parse_args(argv)
    rows = gpu_mining.run(args)
    assert [row["skipped"] for row in rows] == ["not run: time budget spent"]
