"""Evaluate a model: mIoU of the per-pixel, per-group and adaptive units.

The model is a checkpoint written by ``mgccl train`` or, for the zero-shot baseline, a plain
open_clip model (``--model open_clip:ARCH --pretrained FILE``, dense features by value-value
attention in the last block, see ``OpenClipDualEncoder``).

``--benchmark synthetic`` scores the built-in held-out split (colour-shape pairs never seen
in training) whole-image at its native size, with each unit's background threshold chosen
on the built-in validation split unless ``--bg-threshold`` is given. Any of the eight
benchmarks is read from the folder its data set ships in (``--root``; layouts in
``mgccl_ops.data.benchmarks``) and scored by mmsegmentation's protocol as TCL and GroupViT
use it: short side resized to 448 (long side at most 2048), sliding 448 x 448 windows with
stride 224, predictions upsampled to the original mask size and scored there, one
confusion matrix over the whole split. There the background threshold is ``--bg-threshold``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from ..backends import BACKENDS, get_ops
from ..data.benchmarks import BENCHMARKS
from ..data.segmentation import SegmentationFolder
from ..evaluate.evaluator import EvalSettings, evaluate
from ..evaluate.prompts import TEMPLATES
from ..evaluate.synthetic import synthetic_scores
from ..evaluate.units import UNITS
from ..evaluate.visualize import save_grid
from ..models import OpenClipDualEncoder
from .common import load_model, table

UNIT_TITLES = {"pixel": "per-pixel", "group": "per-group", "adaptive": "adaptive unit"}


def add_eval_arguments(parser: argparse.ArgumentParser, eval_images: int) -> None:
    """Options shared by ``eval`` and ``demo``."""
    parser.add_argument("--eval-images", type=int, default=eval_images, help="built-in held-out images")
    parser.add_argument("--val-images", type=int, default=96, help="built-in validation images (thresholds)")
    parser.add_argument("--groups", type=int, default=8, help="clusters per image of the per-group unit")
    parser.add_argument(
        "--merge-threshold",
        default="0.9",
        help="region_merge threshold of the adaptive unit: a float or auto (default %(default)s)",
    )
    parser.add_argument(
        "--colour-weight",
        type=float,
        default=1.0,
        help="weight of the image colours in the adaptive unit's merge guide; 0 merges on the "
        "features alone, on the feature grid (default %(default)s)",
    )
    parser.add_argument("--png-images", type=int, default=8, help="rows of the PNG grid")


def settings_from_args(args: argparse.Namespace, templates=("{}",)) -> EvalSettings:
    merge = args.merge_threshold if args.merge_threshold == "auto" else float(args.merge_threshold)
    return EvalSettings(units=UNITS, groups=args.groups, merge_threshold=merge, colour_weight=args.colour_weight,
                        templates=templates, keep=args.png_images)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mgccl eval``."""
    parser.add_argument("checkpoint", nargs="?", help="checkpoint.pt written by mgccl train (or use --model)")
    parser.add_argument("--model", help="open_clip:ARCH to score a plain open_clip model (zero-shot baseline)")
    parser.add_argument("--pretrained", help="open_clip weights file for --model (random weights without it)")
    parser.add_argument("--benchmark", default="synthetic", choices=["synthetic", *BENCHMARKS])
    parser.add_argument("--root", help="the benchmark's folder as its data set ships (see README)")
    parser.add_argument("--split", help="split file or folder name (default: the benchmark's evaluation split)")
    parser.add_argument("--short-side", type=int, default=448,
                        help="resize images to this short side; 0 keeps their size (default %(default)s)")  # fmt: skip
    parser.add_argument("--max-long-side", type=int, default=2048,
                        help="cap of the long side after the resize; 0 for none (default %(default)s)")  # fmt: skip
    parser.add_argument("--window", type=int, default=448,
                        help="sliding-window side; 0 for whole-image inference (default %(default)s)")  # fmt: skip
    parser.add_argument("--stride", type=int, default=224, help="sliding-window stride (default %(default)s)")
    parser.add_argument("--units", nargs="+", choices=UNITS, default=list(UNITS), help="prediction units to score")
    parser.add_argument("--bg-threshold", type=float, help="background score threshold")
    parser.add_argument("--backend", choices=BACKENDS, default="fused", help="region ops backend")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default %(default)s)")
    parser.add_argument("--png", help="write the image / ground truth / prediction grid here")
    parser.add_argument("--predictions", help="write each unit's predicted label PNGs under this folder")
    parser.add_argument("--json", help="write the scores here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the built-in splits")
    add_eval_arguments(parser, eval_images=200)


def builtin_scores(model, args: argparse.Namespace, ops, threshold: float | None = None, background_key: bool = True):
    """:func:`~mgccl_ops.evaluate.synthetic.synthetic_scores` with the command line's settings."""
    return synthetic_scores(model, settings_from_args(args), ops, eval_images=args.eval_images,
                            val_images=args.val_images, seed=args.seed, threshold=threshold,
                            background_key=background_key)  # fmt: skip


def _model(args: argparse.Namespace):
    """The model to score: a training checkpoint or a plain open_clip model."""
    if args.model is None:
        if args.checkpoint is None:
            raise SystemExit("mgccl eval: give a CHECKPOINT or --model open_clip:ARCH")
        if args.pretrained:
            raise SystemExit("mgccl eval: --pretrained goes with --model open_clip:ARCH, not with a checkpoint")
        return load_model(args.checkpoint)
    if args.checkpoint is not None:
        raise SystemExit("mgccl eval: give either a CHECKPOINT or --model, not both")
    kind, _, arch = args.model.partition(":")
    if kind != "open_clip" or not arch:
        raise SystemExit(f"mgccl eval: --model must be open_clip:ARCH, got {args.model!r}")
    if args.pretrained and not Path(args.pretrained).is_file():
        raise SystemExit(f"mgccl eval: --pretrained file not found: {args.pretrained}")
    return OpenClipDualEncoder.from_name(arch, pretrained=args.pretrained, dense="value_value").eval()


def run(args: argparse.Namespace) -> int:
    """Run ``mgccl eval``."""
    model = _model(args).to(args.device)
    ops = get_ops(args.backend)
    if args.benchmark == "synthetic":
        results, thresholds = builtin_scores(model, args, ops, args.bg_threshold)
    else:
        if not args.root:
            raise SystemExit(f"mgccl eval: --root is needed for the {args.benchmark} benchmark")
        data = SegmentationFolder(args.root, args.benchmark, args.split)
        bench = data.benchmark
        settings = settings_from_args(args, TEMPLATES)
        settings.units = tuple(args.units)
        settings.short_side, settings.max_long_side = args.short_side or None, args.max_long_side or None
        settings.window, settings.stride = args.window or None, args.stride or None
        settings.batch_size = 8
        if args.predictions:
            settings.on_prediction = _prediction_writer(Path(args.predictions))
        settings.background_threshold = args.bg_threshold if args.bg_threshold is not None else 0.5
        result = evaluate(model, data, data.class_names, bench.has_background, ops, settings)
        results = {unit: result for unit in settings.units}
        thresholds = dict.fromkeys(settings.units, settings.background_threshold if bench.has_background else None)
        print(f"{len(data)} images; skipped {dict(data.skipped) or 'none'}")
        if args.predictions:
            print(f"predictions: {args.predictions}/UNIT/...")
    rows = [[UNIT_TITLES[u], 100 * results[u].matrices[u].mean_iou(), thresholds[u]] for u in results]
    print(table(["unit", "mIoU", "bg threshold"], rows))
    if args.json:
        scores = {u: 100 * results[u].matrices[u].mean_iou() for u in results}
        Path(args.json).write_text(json.dumps({"miou": scores, "background_thresholds": thresholds}, indent=2))
    if args.png:
        write_png(args.png, results)
        print(f"wrote {args.png}")
    return 0


def _prediction_writer(folder: Path):
    """A callback writing each unit's predicted class ids as a grey PNG at the mask's size,
    at ``folder/UNIT/`` + the mask's path under the benchmark root."""

    def write(sample: dict, unit: str, labels: torch.Tensor) -> None:
        path = (folder / unit / sample["name"]).with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(labels.to(torch.uint8).numpy()).save(path)

    return write


def write_png(path: str, results: dict) -> None:
    """The grid of the first images with every unit's prediction."""
    first = next(iter(results.values()))
    predictions = {UNIT_TITLES[u]: r.predictions[u] for u, r in results.items()}
    save_grid(path, first.images, first.targets, predictions, len(first.class_names))
