"""A word-level tokenizer for small vocabularies (the built-in data, concept lists)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch

_WORD = re.compile(r"[a-z0-9]+")


def split_words(text: str) -> list[str]:
    """Lower-cased alphanumeric words of ``text``, punctuation dropped."""
    return _WORD.findall(text.lower())


class WordTokenizer:
    """Maps texts to padded word-id tensors; id 0 is padding, id 1 an unknown word.

    Args:
        words: the vocabulary (duplicates and order do not matter; it is sorted).
        context_length: texts are cut to this many words.
    """

    pad_id = 0
    unk_id = 1

    def __init__(self, words: Iterable[str], context_length: int = 24):
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        self.words = sorted({w for word in words for w in split_words(word)})
        self.context_length = context_length
        self._ids = {w: i + 2 for i, w in enumerate(self.words)}

    @property
    def vocab_size(self) -> int:
        """Number of ids, padding and unknown included."""
        return len(self.words) + 2

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids int64 [N, context_length] for N texts, right-padded with 0."""
        out = torch.zeros(len(texts), self.context_length, dtype=torch.int64)
        for row, text in enumerate(texts):
            ids = [self._ids.get(w, self.unk_id) for w in split_words(text)][: self.context_length]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return out

    def state_dict(self) -> dict:
        """Plain-data state, for checkpoints."""
        return {"words": list(self.words), "context_length": self.context_length}

    @classmethod
    def from_state_dict(cls, state: dict) -> WordTokenizer:
        """Inverse of :meth:`state_dict`."""
        return cls(state["words"], state["context_length"])
