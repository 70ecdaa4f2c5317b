"""Entity phrases of real captions by plural-aware matching against a concept vocabulary.

No parser model can be downloaded here, so nouns are found by looking the caption's words
up in a list of concepts (e.g. a benchmark's class names): "two teddy bears and a puppy"
with concepts {"teddy bear", "puppy"} gives ["teddy bear", "puppy"].
"""

from __future__ import annotations

from collections.abc import Iterable

from ..models.tokenizer import split_words

_IRREGULAR = {
    "people": "person",
    "men": "man",
    "women": "woman",
    "children": "child",
    "mice": "mouse",
    "geese": "goose",
    "feet": "foot",
    "teeth": "tooth",
    "oxen": "ox",
    "dice": "die",
    "cacti": "cactus",
}


def singular_forms(word: str) -> list[str]:
    """Candidate singulars of ``word`` (itself first); a caller keeps those it knows.

    Covers irregular plurals and the regular endings -s, -es, -ies -> -y and
    -ves -> -f / -fe; over-generation is harmless when matched against a vocabulary.
    """
    forms = [word]
    if word in _IRREGULAR:
        forms.append(_IRREGULAR[word])
    if word.endswith("ies") and len(word) > 4:
        forms.append(word[:-3] + "y")
    if word.endswith("ves") and len(word) > 4:
        forms += [word[:-3] + "f", word[:-3] + "fe"]
    if word.endswith("es") and len(word) > 3:
        forms.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss") and len(word) > 2:
        forms.append(word[:-1])
    return forms


class ConceptVocabulary:
    """Finds the concepts a caption names, longest match first, in caption order.

    Args:
        concepts: concept names, single words or multi-word phrases ("traffic light").
            A plural in the caption matches through its last word ("traffic lights").
    """

    def __init__(self, concepts: Iterable[str]):
        self._phrases: dict[tuple[str, ...], str] = {}
        for concept in concepts:
            words = tuple(split_words(concept))
            if words:
                self._phrases.setdefault(words, " ".join(words))
        self._longest = max((len(w) for w in self._phrases), default=0)

    def __len__(self) -> int:
        return len(self._phrases)

    def __call__(self, caption: str, limit: int | None = None) -> list[str]:
        """Distinct concepts named in ``caption`` (at most ``limit``), in order of appearance."""
        words = split_words(caption)
        found: list[str] = []
        i = 0
        while i < len(words) and (limit is None or len(found) < limit):
            match = self._match_at(words, i)
            if match is None:
                i += 1
                continue
            length, concept = match
            if concept not in found:
                found.append(concept)
            i += length
        return found

    def _match_at(self, words: list[str], i: int) -> tuple[int, str] | None:
        for length in range(min(self._longest, len(words) - i), 0, -1):
            head = tuple(words[i : i + length - 1])
            for last in singular_forms(words[i + length - 1]):
                concept = self._phrases.get(head + (last,))
                if concept is not None:
                    return length, concept
        return None
