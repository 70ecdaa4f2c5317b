"""The ``mgccl`` command end to end on tiny settings."""

import json

import benchmark_fixtures
import numpy as np
import pytest
import torch
from PIL import Image
from test_readers import _expected_labels as expected_labels
from torchmetrics.classification import MulticlassJaccardIndex

from mgccl_ops.bench.training_memory import step_peak_memory_mib
from mgccl_ops.cli import build_parser, main
from mgccl_ops.data.benchmarks import BENCHMARKS
from mgccl_ops.models import SmallDualEncoder, split_words
from mgccl_ops.train import checkpoint

TINY = ["--steps", "2", "--batch-size", "4", "--eval-images", "2", "--val-images", "2", "--png-images", "2",
        "--backend", "reference", "--no-progress"]  # fmt: skip


def test_demo_end_to_end_prints_the_tables_and_writes_the_png(tmp_path, capsys):
    assert main(["demo", "--out-dir", str(tmp_path), "--skip-memory", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "mIoU (%) on the held-out split: 2 images, 13 classes" in printed
    for row in ("per-pixel", "per-group", "adaptive unit"):
        assert row in printed
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert set(summary["miou"]) == {"full", "object_only"}
    assert set(summary["miou"]["full"]) == {"pixel", "group", "adaptive"}
    with Image.open(tmp_path / "predictions.png") as png:
        assert png.size[0] > png.size[1] > 0
    assert (tmp_path / "full" / "checkpoint.pt").is_file() and (tmp_path / "object_only" / "log.jsonl").is_file()


def test_train_resume_and_eval(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out-dir", str(run), *TINY[:4], "--backend", "reference", "--no-progress"]) == 0
    assert main(["train", "--out-dir", str(run), "--steps", "3", "--batch-size", "4", "--backend", "reference",
                 "--no-progress", "--resume"]) == 0  # fmt: skip
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 3]  # logged every 10 steps and at the last step of each call
    png = tmp_path / "grid.png"
    args = ["eval", str(run / "checkpoint.pt"), "--eval-images", "2", "--bg-threshold", "0.5", "--png", str(png),
            "--png-images", "2", "--backend", "reference"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "adaptive unit" in printed and png.is_file()


def test_train_reads_an_image_caption_folder(tmp_path, capsys):
    data = tmp_path / "pairs"
    data.mkdir()
    for i, caption in enumerate(["a dog on grass", "two cats", "a cat and a dog", "grass"]):
        Image.new("RGB", (40, 30), (40 * i, 90, 20)).save(data / f"{i}.jpg")
        (data / f"{i}.txt").write_text(caption)
    (data / "lonely.jpg").write_bytes(b"broken")
    args = ["train", "--data", f"folder:{data}", "--out-dir", str(tmp_path / "run"), "--image-size", "32",
            "--steps", "2", "--batch-size", "4", "--backend", "reference", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "streaming pairs from 5 images" in capsys.readouterr().out
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert set(record["skipped"]) <= {"missing_caption"}
    with pytest.raises(SystemExit, match="--data must be"):
        main(["train", "--data", "ftp:x", "--out-dir", str(tmp_path / "x")])


def test_bench_is_handed_to_the_harness(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    assert "mgccl bench" in capsys.readouterr().out
    assert "bench" in build_parser().format_help()


@pytest.mark.parametrize("scope", ["step", "objective"])
def test_step_memory_factory_runs_in_the_harness_subprocess(tmp_path, scope):
    assert main(["train", "--out-dir", str(tmp_path), "--steps", "1", "--batch-size", "2", "--no-progress"]) == 0
    params = {"backend": "reference", "batch_size": 2, "hard_negatives": 2, "scope": scope,
              "checkpoint_path": str(tmp_path / "checkpoint.pt")}  # fmt: skip
    peak = step_peak_memory_mib(params)  # with MEASURE_ENV, as compare_peak_memory measures
    assert peak is not None and peak > 0


def test_demo_prints_the_memory_table(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --out-dir, as README's command uses
    assert main(["demo", "--out-dir", "runs/demo", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "whole step" in printed and "MGCCL objective only" in printed
    memory = json.loads((tmp_path / "runs/demo/demo.json").read_text())["peak_memory_mib"]
    assert all(memory[scope][backend] is not None for scope in ("step", "objective") for backend in memory[scope])


def test_training_step_benchmark_writes_its_report(tmp_path):
    assert main(["train", "--out-dir", str(tmp_path), "--steps", "1", "--batch-size", "2", "--no-progress"]) == 0
    argv = ["bench", "training_step", "--checkpoint", str(tmp_path / "checkpoint.pt"), "--batches", "2",
            "--hard-negatives", "2", "--checkpointing", "on", "--repeats", "1",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads((tmp_path / "out" / "training_step.json").read_text())
    assert [r["provider"] for r in rows] == ["mgccl (K=2, checkpointing on)", "pytorch (K=2, checkpointing on)"]
    assert all(r["peak_mem_mib"] is not None and r["time_ms"]["median"] > 0 for r in rows)
    assert (tmp_path / "out" / "training_step.png").is_file()


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A randomly initialised small model saved as mgccl train saves it (model spec + weights)."""
    torch.manual_seed(0)
    words = sorted({w for b in BENCHMARKS.values() for n in b.class_names for w in split_words(n)})
    model = SmallDualEncoder(words, dim=16)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    checkpoint.save_atomic({"model_spec": model.describe(), "model": model.state_dict()}, path)
    return path


@pytest.mark.parametrize("benchmark", sorted(BENCHMARKS))
def test_eval_scores_every_benchmark_layout_at_the_original_resolution(tmp_path, small_checkpoint, benchmark):
    root = tmp_path / "data"
    stored = benchmark_fixtures.build(root, benchmark, shapes=((18, 26), (30, 14)))
    out = tmp_path / "pred"
    args = ["eval", str(small_checkpoint), "--benchmark", benchmark, "--root", str(root), "--short-side", "20",
            "--window", "16", "--stride", "8", "--groups", "3", "--bg-threshold", "0.0", "--backend", "reference",
            "--predictions", str(out), "--json", str(tmp_path / "scores.json")]  # fmt: skip
    assert main(args) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())["miou"]
    classes = len(BENCHMARKS[benchmark].class_names)
    for unit in ("pixel", "group", "adaptive"):
        files = sorted((out / unit).rglob("*.png"))
        assert len(files) == len(stored)
        metric = MulticlassJaccardIndex(classes, average="macro", ignore_index=255)
        for file, mask in zip(files, stored, strict=True):
            with Image.open(file) as png:
                pred = torch.from_numpy(np.asarray(png).astype(np.int64))
            assert pred.shape == mask.shape  # written and scored at the original size
            metric.update(pred, torch.from_numpy(expected_labels(benchmark, mask)))
        assert scores[unit] == pytest.approx(100 * float(metric.compute()), abs=1e-4), unit


def test_eval_refuses_rgb_masks_and_missing_splits(tmp_path, small_checkpoint):
    benchmark_fixtures.build(tmp_path, "voc")
    base = ["eval", str(small_checkpoint), "--benchmark", "voc", "--root", str(tmp_path)]
    with pytest.raises(SystemExit, match="mgccl eval: voc split file not found: .*train.txt"):
        main([*base, "--split", "train"])  # was: every mask scored
    Image.new("RGB", (16, 12), (15, 15, 15)).save(tmp_path / "SegmentationClass" / "img0.png")
    with pytest.raises(SystemExit, match="mgccl eval: mask .*img0.png is a 'RGB' image"):
        main(base)  # was: channel 0 kept


def test_version_names_the_package_and_its_torch(capsys):
    import mgccl_ops

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out.strip()
    info = mgccl_ops.build_info()
    assert printed.startswith(f"mgccl_ops {mgccl_ops.__version__} (built for torch {info['torch_version']}, ")
    assert ("CPU only" in printed) != info["with_cuda"]
    assert printed.endswith(f"; running torch {torch.__version__})")
