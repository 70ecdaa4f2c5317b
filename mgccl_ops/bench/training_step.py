"""Benchmark of one MGCCL training step (forward + backward) with the fused ops against plain PyTorch.

The step of ``mgccl demo``: the small model restored from a trained checkpoint (so that its
pixel level labels pixels as in training), a batch of the built-in training data, the full
three-level objective, with the ``mgccl_ops`` ops (``mgccl``) or their plain-PyTorch
references (``pytorch``, which gather the [N, K, D] negative keys of every pixel row). The
sweep covers the batch size, the number of mined hard negatives K and whether the image
encoder runs under activation checkpointing. Time is the median over repeated steps; peak
memory is measured by :func:`mgccl_ops.bench.training_memory.step_peak_memory_mib` (a fresh process,
one warm-up step).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mgccl_ops.bench import harness, report
from mgccl_ops.bench.training_memory import FACTORY, step_peak_memory_mib

NAME = "training_step"
PROVIDERS = {"mgccl": "fused", "pytorch": "reference"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default="runs/demo/full/checkpoint.pt",
                        help="a trained checkpoint of the small model (default: mgccl demo's)")  # fmt: skip
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--hard-negatives", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--checkpointing", choices=("on", "off", "both"), default="both",
                        help="activation checkpointing of the image encoder")  # fmt: skip
    harness.add_output_arguments(parser)


def run(args: argparse.Namespace) -> list[dict]:
    if not Path(args.checkpoint).is_file():
        raise SystemExit(
            f"mgccl bench {NAME}: no checkpoint at {args.checkpoint}; run `mgccl demo` or pass --checkpoint"
        )
    checkpoint = os.path.abspath(args.checkpoint)
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.checkpointing]
    context = harness.run_context("cpu")
    rows = []
    for recompute in modes:
        for negatives in args.hard_negatives:
            for batch in args.batches:
                for provider, backend in PROVIDERS.items():
                    params = {"backend": backend, "batch_size": batch, "hard_negatives": negatives, "scope": "step",
                              "checkpoint_path": checkpoint, "checkpoint_activations": recompute}  # fmt: skip
                    label = f"{provider} (K={negatives}, checkpointing {'on' if recompute else 'off'})"
                    row_params = {"batch": batch, "hard_negatives": negatives, "checkpointing": recompute}
                    row = harness.measure_case(NAME, label, FACTORY, params, row_params, context, device="cpu",
                                               repeats=args.repeats, peak=step_peak_memory_mib)  # fmt: skip
                    rows.append(row)
                    median = row["time_ms"]["median"]
                    print(f"{label:40s} B={batch:3d}  {median:8.1f} ms  peak {row['peak_mem_mib']} MiB", flush=True)
    report.add_ratios_to_pytorch(rows, "batch")
    report.write_report(
        rows,
        args.out,
        NAME,
        f"MGCCL training step (forward + backward) of the demo's model, float32, {context['device_name']}",
        columns=[
            ("provider", "provider"),
            ("B", "params.batch"),
            *report.TIME_COLUMNS,
            ("time / pytorch", "time_vs_pytorch"),
            ("peak MiB", "peak_mem_mib"),
            ("pytorch peak / peak", "memory_saving"),
        ],
        x_key="batch",
        notes=(
            f"mgccl_ops {context['version']}, torch {context['torch']}. One step = the small model's "
            "forward, the object, part, pixel and background levels and the backward pass, on a batch of the "
            f"built-in training data, model from {args.checkpoint}. Median of {args.repeats} steps after one "
            "warm-up; peak memory is the growth of the resident set during one step in a fresh process, after "
            "one warm-up step (model and batch excluded)."
        ),
    )
    return rows
