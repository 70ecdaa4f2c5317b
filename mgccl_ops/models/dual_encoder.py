"""The small image-text model for the built-in data: dense image encoder + word text encoder."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .image_encoder import DenseImageEncoder
from .text_encoder import WordTextEncoder
from .tokenizer import WordTokenizer


class SmallDualEncoder(nn.Module):
    """Dense image encoder, word-level text encoder and one learnable logit scale.

    Every model of the training layer has this interface: ``encode_image(images)`` ->
    ``(dense [B, P, D], global [B, D], (h, w))``, ``encode_text(texts)`` -> ``[N, D]`` (all
    unit norm), ``logit_scale`` (log of the contrastive scale), ``background_emb`` (a
    learned [D] key for unnamed background, used by the pixel level) and ``describe()``
    (the arguments that rebuild it).

    Args:
        words: vocabulary of the word tokenizer.
        dim: shared embedding width D.
        context_length: longest text, in words.
        checkpoint_activations: run the image encoder under activation checkpointing
            while training (see :class:`DenseImageEncoder`).
    """

    def __init__(
        self, words: Sequence[str], dim: int = 64, context_length: int = 24, checkpoint_activations: bool = False
    ):
        super().__init__()
        self.tokenizer = WordTokenizer(words, context_length)
        self.image_encoder = DenseImageEncoder(dim, checkpoint_activations=checkpoint_activations)
        self.text_encoder = WordTextEncoder(self.tokenizer.vocab_size, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.background_emb = nn.Parameter(torch.randn(dim) / math.sqrt(dim))
        self.dim = dim

    def describe(self) -> dict:
        """Constructor arguments, enough to rebuild the module before loading its weights."""
        return {
            "kind": "small",
            "words": list(self.tokenizer.words),
            "dim": self.dim,
            "context_length": self.tokenizer.context_length,
            "checkpoint_activations": self.image_encoder.checkpoint_activations,
        }

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Images [B, 3, H, W] (0..255) -> dense [B, P, D], global [B, D], grid (h, w)."""
        return self.image_encoder(images)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm embeddings [N, D] of N texts."""
        tokens = self.tokenizer(texts).to(self.logit_scale.device)
        return self.text_encoder(tokens)
