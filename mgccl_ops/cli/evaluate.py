"""Evaluate a trained model: mIoU of the per-pixel, per-group and adaptive units.

``--benchmark synthetic`` scores the built-in held-out split (colour-shape pairs never seen
in training), with each unit's background threshold chosen on the built-in validation
split unless ``--bg-threshold`` is given. Any of the eight benchmarks is read from a
VOC-style folder (``--root``); there the background threshold is ``--bg-threshold``.
"""

from __future__ import annotations

import argparse

from ..data.benchmarks import BENCHMARKS
from ..data.segmentation import SegmentationFolder
from ..data.synthetic import SyntheticShapes
from ..evaluate.calibrate import calibrate_background
from ..evaluate.evaluator import EvalSettings, evaluate
from ..evaluate.prompts import TEMPLATES
from ..evaluate.units import UNITS
from ..evaluate.visualize import save_grid
from ..train.backend import BACKENDS, get_ops
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
    parser.add_argument("checkpoint", help="checkpoint.pt written by mgccl train")
    parser.add_argument("--benchmark", default="synthetic", choices=["synthetic", *BENCHMARKS])
    parser.add_argument("--root", help="VOC-style folder of a real benchmark")
    parser.add_argument("--split", default="val", help="split list of the real benchmark")
    parser.add_argument("--size", type=int, default=224, help="side real images are resized to")
    parser.add_argument("--bg-threshold", type=float, help="background score threshold")
    parser.add_argument("--backend", choices=BACKENDS, default="fused", help="region ops backend")
    parser.add_argument("--png", help="write the image / ground truth / prediction grid here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the built-in splits")
    add_eval_arguments(parser, eval_images=200)


def synthetic_scores(model, args: argparse.Namespace, ops, threshold: float | None = None, background_key: bool = True):
    """Evaluate on the built-in held-out split; returns (result, thresholds per unit).

    ``background_key=False`` finds background by the threshold alone, for a model whose
    background key was never trained (the object-level-only ablation).
    """
    settings = settings_from_args(args)
    settings.background_key = background_key
    held = SyntheticShapes("heldout", args.eval_images, seed=args.seed + 1)
    if threshold is None:
        val = SyntheticShapes("val", args.val_images, seed=args.seed + 2)
        thresholds = calibrate_background(model, val, val.class_names, ops, settings)
    else:
        thresholds = dict.fromkeys(settings.units, threshold)
    settings.background_threshold = thresholds
    result = evaluate(model, held, held.class_names, True, ops, settings)
    return dict.fromkeys(settings.units, result), thresholds


def run(args: argparse.Namespace) -> int:
    """Run ``mgccl eval``."""
    model = load_model(args.checkpoint)
    ops = get_ops(args.backend)
    if args.benchmark == "synthetic":
        results, thresholds = synthetic_scores(model, args, ops, args.bg_threshold)
    else:
        if not args.root:
            raise SystemExit(f"mgccl eval: --root is needed for the {args.benchmark} benchmark")
        data = SegmentationFolder(args.root, args.benchmark, args.split)
        bench = data.benchmark
        settings = settings_from_args(args, TEMPLATES)
        settings.background_threshold = args.bg_threshold if args.bg_threshold is not None else 0.5
        result = evaluate(model, data, data.class_names, bench.has_background, ops, settings)
        results = {unit: result for unit in settings.units}
        thresholds = dict.fromkeys(settings.units, settings.background_threshold if bench.has_background else None)
        print(f"{len(data)} images; skipped {dict(data.skipped) or 'none'}")
    rows = [[UNIT_TITLES[u], 100 * results[u].matrices[u].mean_iou(), thresholds[u]] for u in results]
    print(table(["unit", "mIoU", "bg threshold"], rows))
    if args.png:
        write_png(args.png, results)
        print(f"wrote {args.png}")
    return 0


def write_png(path: str, results: dict) -> None:
    """The grid of the first images with every unit's prediction."""
    first = next(iter(results.values()))
    predictions = {UNIT_TITLES[u]: r.predictions[u] for u, r in results.items()}
    save_grid(path, first.images, first.targets, predictions, len(first.class_names))
