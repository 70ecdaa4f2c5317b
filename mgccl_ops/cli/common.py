"""Pieces shared by the subcommands: loading a trained model, printing tables."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..models import build_model
from ..train import checkpoint


def load_model(path: str) -> nn.Module:
    """The model stored in a training checkpoint, in eval mode on the CPU."""
    state = checkpoint.load(path)
    if "model" not in state or "model_spec" not in state:
        raise ValueError(f"checkpoint {path} holds no model (no 'model' / 'model_spec'); is it from mgccl train?")
    model = build_model(state["model_spec"])
    model.load_state_dict(state["model"])
    return model.eval()


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with right-aligned columns (floats with one decimal)."""
    cells = [[f"{c:.1f}" if isinstance(c, float) else str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
