"""The ``mgccl`` command: ``demo``, ``train``, ``eval``, ``export`` and ``bench``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import demo, evaluate, export, train


def version_string() -> str:
    """``mgccl --version``: the package version and what its compiled module was built for."""
    import torch

    from mgccl_ops import __version__, build_info

    info = build_info()
    cuda = f"CUDA {info['cuda_version']} ({info['cuda_archs']})" if info["with_cuda"] else "CPU only"
    return (
        f"mgccl_ops {__version__} (built for torch {info['torch_version']}, {cuda}; running torch {torch.__version__})"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mgccl`` (``bench`` is parsed by the benchmark harness)."""
    # Raw text: the version line is printed as is, not wrapped to the terminal width.
    parser = argparse.ArgumentParser(prog="mgccl", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--version", action="version", version=version_string())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in (("demo", demo), ("train", train), ("eval", evaluate), ("export", export)):
        sub = commands.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    commands.add_parser("bench", help="benchmark the ops (mgccl bench --help for the cases)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mgccl`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from mgccl_ops.bench.cli import main as bench_main

        bench_main(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (OSError, ValueError) as error:
        # Bad paths, files and settings: one line naming the path or value, not a traceback.
        raise SystemExit(f"mgccl {args.command}: {error}") from None
