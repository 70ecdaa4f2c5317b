"""Train a segmentation model from image-caption pairs with the MGCCL objective.

Data: the built-in procedural set (default), a folder of image + .txt pairs
(``folder:PATH``) or WebDataset-style shards (``shards:SPEC``, e.g.
``shards:cc3m/{00000..00099}.tar``). Entity phrases of real captions come from matching a
concept vocabulary (``--concepts`` file, one per line; default: every class name of the
eight benchmarks). Real pairs are streamed, decoded one at a time in the data-loader workers
(``--limit`` caps the captions read for the small model's vocabulary). Under ``torchrun`` the
run uses DDP across the processes; rank 0 writes the checkpoint and the log.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from ..data.benchmarks import BENCHMARKS
from ..data.entities import ConceptVocabulary
from ..data.stream import PairStream
from ..models import OpenClipDualEncoder, SmallDualEncoder, split_words
from ..train import checkpoint
from ..train.config import RUN_FIELDS, TrainConfig
from ..train.objective import ObjectiveConfig
from ..train.trainer import train
from .options import RecordedStore, add_field_options, given_options, read_config_file, training_fields

# Options that may change when a run is resumed; any other given option must equal the saved one.
RESUME_MAY_CHANGE = (
    "steps",
    "progress",
    "workers",
    "device",
    "log_every",
    "checkpoint_every",
    "tensorboard",
    "distributed_mode",
)


def add_training_arguments(parser: argparse.ArgumentParser, steps: int, batch_size: int) -> None:
    """Options shared by ``train`` and ``demo``: every ``TrainConfig`` field except ``out_dir``
    and the data and model options (:data:`RUN_FIELDS`), and every ``ObjectiveConfig`` field."""
    train_names, objective_names = training_fields(exclude=("out_dir", *RUN_FIELDS))
    defaults = {"steps": steps, "batch_size": batch_size}
    add_field_options(parser.add_argument_group("training"), TrainConfig, train_names, defaults)
    add_field_options(parser.add_argument_group("objective"), ObjectiveConfig, objective_names, {})


def config_from_args(
    args: argparse.Namespace, out_dir: str, object_only: bool = False, file: dict | None = None
) -> TrainConfig:
    """A ``TrainConfig`` from the options: each field from the command line if given there,
    else from the config ``file`` (a ``TrainConfig.to_dict()``-shaped dict) if it has it,
    else the option's default."""
    given, file = given_options(args), dict(file or {})
    file_objective = file.pop("objective", None) or {}
    train_names, objective_names = training_fields(exclude=("out_dir",))

    def value(name: str, from_file: dict):
        if name not in given and name in from_file:
            return from_file[name]
        return getattr(args, name, None)

    values = {n: value(n, file) for n in train_names if hasattr(args, n) or n in file}
    values = {n: v for n, v in values.items() if v is not None}
    objective = {n: value(n, file_objective) for n in objective_names}
    if object_only:
        objective.update(part_weight=0.0, pixel_weight=0.0)
    return TrainConfig(out_dir=out_dir, objective=ObjectiveConfig(**objective), **values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mgccl train``."""
    parser.add_argument("--out-dir", default="runs/train", action=RecordedStore,
                        help="checkpoint and log folder (default %(default)s)")  # fmt: skip
    parser.add_argument("--config", help="JSON or TOML file of training options (TrainConfig.to_dict() layout); "
                        "options given on the command line win")  # fmt: skip
    parser.add_argument("--objective", choices=("full", "object"), default="full",
                        help="all three levels, or the object-level-only ablation")  # fmt: skip
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in OUT_DIR with its saved options, data and model (--steps may "
                             "extend it; unchanged, the result equals an uninterrupted run)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="start a new run in an OUT_DIR that holds one")
    run_group = parser.add_argument_group("data and model (restored by --resume)")
    add_field_options(run_group, TrainConfig, [n for n in RUN_FIELDS if n != "image_size"], {})
    run_group.add_argument("--image-size", type=int, action=RecordedStore,
                           help="side images are resized to (default: the model's; small: 96)")  # fmt: skip
    add_training_arguments(parser, steps=400, batch_size=32)


def _concepts(path: str | None) -> ConceptVocabulary:
    if path is None:
        return ConceptVocabulary(n for b in BENCHMARKS.values() for n in b.class_names if n != "background")
    if not Path(path).is_file():
        raise FileNotFoundError(f"concepts file not found: {path}")
    lines = Path(path).read_text().splitlines()
    return ConceptVocabulary(line.strip() for line in lines if line.strip())


def _given_values(args: argparse.Namespace, file: dict) -> dict:
    """``{field: value}`` of the options the command line or the config file gave
    (objective fields under ``objective``); ``--objective object`` as its two weights."""
    given = given_options(args)
    train_names, objective_names = training_fields(exclude=("out_dir",))
    values = {n: file[n] for n in train_names if n in file}
    values.update({n: getattr(args, n) for n in train_names if n in given})
    objective = dict(file.get("objective") or {})
    objective.update({n: getattr(args, n) for n in objective_names if n in given})
    if args.objective == "object":
        objective.update(part_weight=0.0, pixel_weight=0.0)
    return {**values, "objective": objective}


def _resumed_config(args: argparse.Namespace, out: Path, file: dict) -> TrainConfig:
    """The saved run's configuration with the options that may change applied; a given option
    that differs from the saved one is refused."""
    ckpt = out / "checkpoint.pt"
    if not ckpt.is_file():
        raise SystemExit(f"mgccl train: --resume: no run to resume in {out} ({ckpt} not found)")
    cfg = TrainConfig.from_dict(checkpoint.load(ckpt)["config"], source=f"checkpoint {ckpt}")
    given = _given_values(args, file)
    conflicts = []
    for name, value in given.pop("objective").items():
        if getattr(cfg.objective, name) != value:
            conflicts.append(f"--{name.replace('_', '-')} {value} (saved: {getattr(cfg.objective, name)})")
    for name, value in given.items():
        if name in RESUME_MAY_CHANGE:
            setattr(cfg, name, value)
        elif getattr(cfg, name) != value:
            conflicts.append(f"--{name.replace('_', '-')} {value} (saved: {getattr(cfg, name)})")
    if conflicts:
        raise SystemExit(
            f"mgccl train: --resume continues the run in {out} with its saved options; these differ: "
            + ", ".join(conflicts)
            + ". Drop them, or start a new run (another --out-dir, or --overwrite)."
        )
    cfg.out_dir = str(out)
    return cfg


def _dataset(cfg: TrainConfig) -> PairStream | None:
    """The streamed image-caption pairs of ``cfg.data`` (None for the built-in data)."""
    if cfg.data == "synthetic":
        return None
    kind, _, where = cfg.data.partition(":")
    if kind not in ("folder", "shards") or not where:
        raise SystemExit(f"mgccl train: --data must be synthetic, folder:PATH or shards:SPEC, got {cfg.data!r}")
    dataset = PairStream(kind, where, size=cfg.image_size, entities=_concepts(cfg.concepts), seed=cfg.seed)
    print(f"streaming pairs from {len(dataset.urls)} {'shards' if kind == 'shards' else 'images'}")
    return dataset


def _open_clip_model(cfg: TrainConfig) -> OpenClipDualEncoder | None:
    """The open_clip model of ``cfg.model`` (weights from ``cfg.pretrained``), or None for
    the small model."""
    if cfg.model == "small":
        if cfg.pretrained:
            raise SystemExit("mgccl train: --pretrained needs --model open_clip:ARCH (the small model has none)")
        return None
    kind, _, arch = cfg.model.partition(":")
    if kind != "open_clip" or not arch:
        raise SystemExit(f"mgccl train: --model must be small or open_clip:ARCH, got {cfg.model!r}")
    if cfg.pretrained and not Path(cfg.pretrained).is_file():
        raise SystemExit(f"mgccl train: --pretrained file not found: {cfg.pretrained}")
    return OpenClipDualEncoder.from_name(arch, pretrained=cfg.pretrained)


def _prepare_folder(out: Path, overwrite: bool) -> None:
    """Refuse to start a new run over an existing one unless ``overwrite``; then clear it."""
    existing = [p for p in (out / "checkpoint.pt", out / "log.jsonl") if p.exists()]
    if existing and not overwrite:
        raise SystemExit(
            f"mgccl train: {out} already holds a run ({existing[0].name}); "
            "use --resume to continue it or --overwrite to start over"
        )
    for path in existing:
        path.unlink()


def run(args: argparse.Namespace) -> int:
    """Run ``mgccl train``."""
    file = read_config_file(args.config) if args.config else {}
    from_file = "out_dir" in file and "out_dir" not in given_options(args)
    out = Path(file["out_dir"] if from_file else args.out_dir)
    if args.resume and args.overwrite:
        raise SystemExit("mgccl train: --resume and --overwrite exclude each other")
    model = None
    if args.resume:
        cfg = _resumed_config(args, out, file)
    else:
        _prepare_folder(out, args.overwrite)
        cfg = config_from_args(args, str(out), object_only=args.objective == "object", file=file)
        model = _open_clip_model(cfg)
        if "image_size" not in given_options(args) and "image_size" not in file and model is not None:
            cfg.image_size = model.image_size
    dataset = _dataset(cfg)
    if model is None and not args.resume and dataset is not None:
        captions = dataset.captions(cfg.limit or 20000)
        if not captions:
            raise SystemExit(f"mgccl train: no usable image-caption pairs in {cfg.data}")
        words = {w for caption in captions for w in split_words(caption)}
        torch.manual_seed(cfg.seed)
        model = SmallDualEncoder(sorted(words), dim=cfg.dim, checkpoint_activations=cfg.checkpoint_activations)
    train(cfg, resume=args.resume, model=model, dataset=dataset)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"checkpoint: {out / 'checkpoint.pt'}  log: {out / 'log.jsonl'}")
    return 0
