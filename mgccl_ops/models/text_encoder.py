"""A small text encoder over word ids: a linear bag of word embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WordTextEncoder(nn.Module):
    """Encodes word-id sequences into L2-normalised embeddings.

    The mean of the word embeddings (padding excluded) goes through one linear map.
    Being linear, a phrase's embedding is the (normalised) sum of its words' parts, so the
    similarity of an image feature to "red star" is its similarity to "red" plus its
    similarity to "star": a colour-shape pair never seen in training is scored from what
    each word learned on its own (open vocabulary on the built-in data).

    Args:
        vocab_size: number of token ids (id 0 is padding).
        dim: output embedding width D.
        width: word embedding width.
    """

    def __init__(self, vocab_size: int, dim: int = 64, width: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width, padding_idx=0)
        self.proj = nn.Linear(width, dim, bias=False)
        nn.init.normal_(self.embed.weight, std=0.5)
        with torch.no_grad():
            self.embed.weight[0].zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embeddings [N, D] (unit norm) of token ids int64 [N, L]; an all-padding row maps to 0."""
        valid = (tokens != 0).unsqueeze(-1).to(self.embed.weight.dtype)
        words = self.embed(tokens) * valid
        mean = words.sum(1) / valid.sum(1).clamp(min=1)
        return F.normalize(self.proj(mean), dim=-1)
