"""Evaluate a trained model: mIoU of the per-pixel, per-group and adaptive units.

``--benchmark synthetic`` scores the built-in held-out split (colour-shape pairs never seen
in training), with each unit's background threshold chosen on the built-in validation
split unless ``--bg-threshold`` is given. Any of the eight benchmarks is read from a
VOC-style folder (``--root``); there the background threshold is ``--bg-threshold``.
"""

from __future__ import annotations

import argparse

from ..backends import BACKENDS, get_ops
from ..data.benchmarks import BENCHMARKS
from ..data.segmentation import SegmentationFolder
from ..evaluate.evaluator import EvalSettings, evaluate
from ..evaluate.prompts import TEMPLATES
from ..evaluate.synthetic import synthetic_scores
from ..evaluate.units import UNITS
from ..evaluate.visualize import save_grid
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


def builtin_scores(model, args: argparse.Namespace, ops, threshold: float | None = None, background_key: bool = True):
    """:func:`~mgccl_ops.evaluate.synthetic.synthetic_scores` with the command line's settings."""
    return synthetic_scores(model, settings_from_args(args), ops, eval_images=args.eval_images,
                            val_images=args.val_images, seed=args.seed, threshold=threshold,
                            background_key=background_key)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Run ``mgccl eval``."""
    model = load_model(args.checkpoint)
    ops = get_ops(args.backend)
    if args.benchmark == "synthetic":
        results, thresholds = builtin_scores(model, args, ops, args.bg_threshold)
    else:
        if not args.root:
            raise SystemExit(f"mgccl eval: --root is needed for the {args.benchmark} benchmark")
        data = SegmentationFolder(args.root, args.benchmark, args.split, size=args.size)
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
