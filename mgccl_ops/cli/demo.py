"""Train on the built-in data and evaluate: the MGCCL main job in one command.

Trains the full three-level objective and, for the same steps, the object-level-only
ablation; scores both on the held-out split (colour-shape pairs never seen in training)
with per-pixel, per-group and adaptive units; measures the peak memory of one training
step with the fused ops and with plain PyTorch; writes a PNG grid and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..backends import get_ops
from ..bench.training_memory import compare_peak_memory
from ..train.trainer import train
from .common import table
from .evaluate import UNIT_TITLES, add_eval_arguments, builtin_scores, write_png
from .train import add_training_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mgccl demo``."""
    parser.add_argument("--out-dir", default="runs/demo", help="runs, PNG and summary (default %(default)s)")
    parser.add_argument("--skip-memory", action="store_true", help="do not measure the step's peak memory")
    add_training_arguments(parser, steps=400, batch_size=32)
    add_eval_arguments(parser, eval_images=200)


def run(args: argparse.Namespace) -> int:
    """Run ``mgccl demo``."""
    start = time.perf_counter()
    out = Path(args.out_dir)
    ops = get_ops(args.backend)
    scores, thresholds = {}, {}
    for name, object_only in (("full", False), ("object_only", True)):
        print(f"== training {name.replace('_', '-')} ({args.steps} steps, batch {args.batch_size}) ==", flush=True)
        model = train(config_from_args(args, str(out / name), object_only=object_only))
        # The ablation never trains the background key, so its background is by threshold alone.
        results, thresholds[name] = builtin_scores(model, args, ops, background_key=not object_only)
        scores[name] = {unit: 100 * r.matrices[unit].mean_iou() for unit, r in results.items()}
        if name == "full":
            png = out / "predictions.png"
            write_png(str(png), results)
            class_count = len(next(iter(results.values())).class_names)
    print(
        f"\nmIoU (%) on the held-out split: {args.eval_images} images, {class_count} classes "
        "(background + colour-shape pairs never seen in training)"
    )
    rows = [[UNIT_TITLES[u], scores["full"][u], scores["object_only"][u]] for u in scores["full"]]
    print(table(["unit", "full MGCCL", "object-level only"], rows))
    summary = {"miou": scores, "background_thresholds": thresholds, "png": str(png), "args": vars(args)}
    summary["args"].pop("run", None)
    if not args.skip_memory:
        trained = str(out / "full" / "checkpoint.pt")
        memory = compare_peak_memory(args.batch_size, args.hard_negatives, trained, device=args.device)
        summary["peak_memory_mib"] = memory
        print(
            f"\npeak memory of one training step (forward + backward) of the trained full model, batch "
            f"{args.batch_size}, {args.hard_negatives} hard negatives (MiB; {_memory_kind(args.device)}; the image "
            "encoder runs under activation checkpointing with both)"
        )
        rows = []
        for scope, title in (("step", "whole step"), ("objective", "MGCCL objective only")):
            fused, plain = memory[scope]["fused"], memory[scope]["reference"]
            ratio = f"{plain / fused:.1f}x" if fused and plain else "n/a"
            rows.append([title, _mib(fused), _mib(plain), ratio])
        print(table(["scope", "fused ops", "plain PyTorch", "plain / fused"], rows))
    summary["wall_s"] = time.perf_counter() - start
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    print(f"\nPNG: {png}\nsummary: {out / 'demo.json'}\nwall time: {summary['wall_s']:.0f} s")
    return 0


def _mib(value: float | None) -> str:
    return "failed" if value is None else f"{value:.1f}"


def _memory_kind(device: str) -> str:
    if device.startswith("cuda"):
        return "CUDA max_memory_allocated growth"
    return "growth of peak RSS over the step, fresh process each"
