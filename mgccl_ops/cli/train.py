"""Train a segmentation model from image-caption pairs with the MGCCL objective.

Data: the built-in procedural set (default), a folder of image + .txt pairs
(``folder:PATH``) or WebDataset-style shards (``shards:SPEC``, e.g.
``shards:cc3m/{00000..00099}.tar``). Entity phrases of real captions come from matching a
concept vocabulary (``--concepts`` file, one per line; default: every class name of the
eight benchmarks). Real pairs are read into memory once (``--limit`` caps them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..backends import BACKENDS
from ..data.benchmarks import BENCHMARKS
from ..data.entities import ConceptVocabulary
from ..data.pairs import ImageTextFolder, PairList, TarShards
from ..models import OpenClipDualEncoder, SmallDualEncoder, split_words
from ..train import checkpoint
from ..train.config import TrainConfig
from ..train.objective import ObjectiveConfig
from ..train.trainer import train


def add_training_arguments(parser: argparse.ArgumentParser, steps: int, batch_size: int) -> None:
    """Options shared by ``train`` and ``demo``."""
    parser.add_argument("--steps", type=int, default=steps, help="optimiser steps (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="pairs per step (default %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation and batch order")
    parser.add_argument("--backend", choices=BACKENDS, default="fused",
                        help="ops: fused kernels or the plain-PyTorch reference (default %(default)s)")  # fmt: skip
    parser.add_argument("--hard-negatives", type=int, default=32,
                        help="mined negatives per part/pixel row (default %(default)s)")  # fmt: skip
    parser.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto", help="autocast")
    parser.add_argument("--device", default="cpu", help="torch device (default %(default)s)")
    parser.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def config_from_args(args: argparse.Namespace, out_dir: str, object_only: bool = False) -> TrainConfig:
    """A ``TrainConfig`` from the shared options."""
    weights = {"part_weight": 0.0, "pixel_weight": 0.0} if object_only else {}
    return TrainConfig(
        out_dir=out_dir,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        backend=args.backend,
        objective=ObjectiveConfig(hard_negatives=args.hard_negatives, **weights),
        amp=args.amp,
        device=args.device,
        workers=args.workers,
        progress=not args.no_progress,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mgccl train``."""
    parser.add_argument("--out-dir", default="runs/train", help="checkpoint and log folder (default %(default)s)")
    parser.add_argument("--data", default="synthetic", help="synthetic | folder:PATH | shards:SPEC")
    parser.add_argument("--concepts", help="concept vocabulary file for entity phrases of real captions")
    parser.add_argument("--limit", type=int, help="read at most this many real pairs")
    parser.add_argument("--model", default="small", help="small | open_clip:ARCH (e.g. open_clip:ViT-B-16)")
    parser.add_argument("--image-size", type=int, default=96, help="side images are resized to")
    parser.add_argument("--objective", choices=("full", "object"), default="full",
                        help="all three levels, or the object-level-only ablation")  # fmt: skip
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT_DIR/checkpoint.pt with its saved settings (--steps may extend "
                             "the run; unchanged, the result equals an uninterrupted run)")  # fmt: skip
    add_training_arguments(parser, steps=400, batch_size=32)


def _concepts(path: str | None) -> ConceptVocabulary:
    if path is None:
        return ConceptVocabulary(n for b in BENCHMARKS.values() for n in b.class_names if n != "background")
    lines = Path(path).read_text().splitlines()
    return ConceptVocabulary(line.strip() for line in lines if line.strip())


def run(args: argparse.Namespace) -> int:
    """Run ``mgccl train``."""
    if args.resume:
        cfg = TrainConfig.from_dict(checkpoint.load(Path(args.out_dir) / "checkpoint.pt")["config"])
        cfg.steps, cfg.progress = args.steps, not args.no_progress
    else:
        cfg = config_from_args(args, args.out_dir, object_only=args.objective == "object")
        cfg.image_size = args.image_size
    dataset = None
    if args.data != "synthetic":
        kind, _, where = args.data.partition(":")
        readers = {"folder": ImageTextFolder, "shards": TarShards}
        if kind not in readers or not where:
            raise SystemExit(f"mgccl train: --data must be synthetic, folder:PATH or shards:SPEC, got {args.data!r}")
        dataset = PairList(readers[kind](where, size=args.image_size, entities=_concepts(args.concepts)), args.limit)
        print(f"read {len(dataset)} pairs; skipped {dict(dataset.skipped) or 'none'}")
        if not len(dataset):
            raise SystemExit("mgccl train: no usable image-caption pairs")
    model = None
    if not args.resume:
        if args.model.startswith("open_clip:"):
            model = OpenClipDualEncoder.from_name(args.model.partition(":")[2])
        elif args.model != "small":
            raise SystemExit(f"mgccl train: --model must be small or open_clip:ARCH, got {args.model!r}")
        elif dataset is not None:
            words = {w for s in dataset.samples for w in split_words(s["caption"])}
            torch.manual_seed(cfg.seed)
            model = SmallDualEncoder(sorted(words), dim=cfg.dim)
    train(cfg, resume=args.resume, model=model, dataset=dataset)
    print(f"checkpoint: {Path(cfg.out_dir) / 'checkpoint.pt'}  log: {Path(cfg.out_dir) / 'log.jsonl'}")
    return 0
