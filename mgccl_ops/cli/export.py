"""Export a trained open_clip model's weights as a file open_clip loads.

``open_clip.create_model(ARCH, pretrained=FILE)`` (or ``--pretrained FILE`` of ``mgccl eval``
and ``mgccl train``) then rebuilds the trained model. Only runs on ``--model open_clip:ARCH``
can be exported; the small model is not an open_clip architecture.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .common import load_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mgccl export``."""
    parser.add_argument("checkpoint", help="checkpoint.pt written by mgccl train --model open_clip:ARCH")
    parser.add_argument("--out", help="weights file to write (default: open_clip_weights.pt beside the checkpoint)")


def run(args: argparse.Namespace) -> int:
    """Run ``mgccl export``."""
    model = load_model(args.checkpoint)
    spec = model.describe()
    if spec["kind"] != "open_clip":
        raise SystemExit(
            f"mgccl export: {args.checkpoint} holds the {spec['kind']!r} model; only runs of "
            "--model open_clip:ARCH export to open_clip weights"
        )
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name("open_clip_weights.pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu().clone() for k, v in model.model.state_dict().items()}, out)
    print(f"wrote {out}\nload it with open_clip.create_model({spec['name']!r}, pretrained={str(out)!r})")
    return 0
