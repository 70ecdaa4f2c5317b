"""Image-text models of the training layer, all with one interface (see ``SmallDualEncoder``)."""

from __future__ import annotations

from torch import nn

from .dual_encoder import SmallDualEncoder
from .image_encoder import DenseImageEncoder
from .open_clip_adapter import OpenClipDualEncoder
from .text_encoder import WordTextEncoder
from .tokenizer import WordTokenizer, split_words

__all__ = [
    "DenseImageEncoder",
    "OpenClipDualEncoder",
    "SmallDualEncoder",
    "WordTextEncoder",
    "WordTokenizer",
    "build_model",
    "split_words",
]


def build_model(spec: dict) -> nn.Module:
    """Rebuild a model from its ``describe()`` dict (weights not loaded)."""
    kind = spec.get("kind")
    if kind == "small":
        return SmallDualEncoder(
            spec["words"], spec["dim"], spec["context_length"], spec.get("checkpoint_activations", False)
        )
    if kind == "open_clip":
        return OpenClipDualEncoder.from_name(spec["name"], dense=spec.get("dense", "tokens"))
    raise ValueError(f"unknown model kind {kind!r}; expected 'small' or 'open_clip'")
