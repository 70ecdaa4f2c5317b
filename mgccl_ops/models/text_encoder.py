"""A small text encoder over word ids: a bag of word embeddings and a residual MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WordTextEncoder(nn.Module):
    """Encodes word-id sequences into L2-normalised embeddings.

    The mean of the word embeddings (padding excluded) goes through a residual MLP and a
    linear projection. Averaging keeps phrases compositional: "red star" lands near the
    combination of what "red" and "star" learned, even if the pair was never seen.

    Args:
        vocab_size: number of token ids (id 0 is padding).
        dim: output embedding width D.
        width: word embedding width.
    """

    def __init__(self, vocab_size: int, dim: int = 64, width: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width, padding_idx=0)
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        self.proj = nn.Linear(width, dim)
        nn.init.normal_(self.embed.weight, std=0.5)
        with torch.no_grad():
            self.embed.weight[0].zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embeddings [N, D] (unit norm) of token ids int64 [N, L]; an all-padding row maps to 0."""
        valid = (tokens != 0).unsqueeze(-1).to(self.embed.weight.dtype)
        words = self.embed(tokens) * valid
        mean = words.sum(1) / valid.sum(1).clamp(min=1)
        return F.normalize(self.proj(mean + self.mlp(mean)), dim=-1)
