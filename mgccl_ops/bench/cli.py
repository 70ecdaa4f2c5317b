"""``mgccl bench NAME [options]``: runs one benchmark and writes its JSON, Markdown and PNG."""

from __future__ import annotations

import argparse
import importlib

# Benchmark name -> module defining NAME, add_arguments(parser) and run(args).
BENCHMARKS = {
    "contrastive": "mgccl_ops.bench.contrastive",
    "distributed": "mgccl_ops.bench.distributed",
    "hard_negatives": "mgccl_ops.bench.hard_negatives",
    "multi_grained": "mgccl_ops.bench.multi_grained",
    "regions": "mgccl_ops.bench.regions",
    "sigmoid_contrastive": "mgccl_ops.bench.sigmoid_contrastive",
    "training_step": "mgccl_ops.bench.training_step",
    "gpu_contrastive": "mgccl_ops.bench.gpu_contrastive",
    "gpu_mining": "mgccl_ops.bench.gpu_mining",
    "gpu_multi_grained": "mgccl_ops.bench.gpu_multi_grained",
    "gpu_regions": "mgccl_ops.bench.gpu_regions",
}


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="mgccl bench", description=__doc__)
    subparsers = parser.add_subparsers(dest="benchmark", required=True)
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(subparsers.add_parser(name, help=(module.__doc__ or "").splitlines()[0]))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    importlib.import_module(BENCHMARKS[args.benchmark]).run(args)
