"""Image-caption pairs from a folder (image + .txt) or WebDataset-style .tar shards.

Both readers are iterable, decode lazily, and never stop on a bad sample: an image that
does not decode or a sample without a caption is skipped and counted in ``skipped``.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from .images import IMAGE_EXTENSIONS, decode_image

EntityFn = Callable[[str], list[str]]


def _sample(image: torch.Tensor, caption: str, entities: EntityFn | None) -> dict:
    return {"image": image, "caption": caption, "entities": entities(caption) if entities else []}


class ImageTextFolder(torch.utils.data.IterableDataset):
    """Pairs ``name.<image ext>`` + ``name.txt`` found (recursively) under ``root``.

    Yields dicts with ``image`` uint8 [3, size, size], ``caption`` and ``entities`` (from
    ``entities(caption)``, e.g. a :class:`ConceptVocabulary`; empty if None).
    ``skipped`` counts ``missing_caption`` and ``corrupt_image`` after (or during) a pass.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
    """

    def __init__(self, root: str | os.PathLike, size: int | None = 96, entities: EntityFn | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image-caption folder not found: {self.root}")
        self.size = size
        self.entities = entities
        self.skipped: Counter = Counter()
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)

    def __iter__(self) -> Iterator[dict]:
        self.skipped = Counter()
        for path in self.files:
            text = path.with_suffix(".txt")
            caption = text.read_text(errors="replace").strip() if text.is_file() else ""
            if not caption:
                self.skipped["missing_caption"] += 1
                continue
            try:
                image = decode_image(str(path), self.size)
            except (OSError, ValueError, SyntaxError):
                self.skipped["corrupt_image"] += 1
                continue
            yield _sample(image, caption, self.entities)


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard paths from a folder, a glob, a brace range (``data-{000..009}.tar``) or a list.

    Raises:
        FileNotFoundError: a named shard or folder does not exist, or nothing matches.
    """
    if not isinstance(spec, str):
        paths = [str(p) for p in spec]
    elif os.path.isdir(spec):
        paths = sorted(glob.glob(os.path.join(spec, "*.tar")))
    else:
        paths = [spec]
        brace = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
        if brace:
            lo, hi = brace.group(1), brace.group(2)
            paths = [
                spec[: brace.start()] + str(i).zfill(len(lo)) + spec[brace.end() :] for i in range(int(lo), int(hi) + 1)
            ]
        elif any(ch in spec for ch in "*?["):
            paths = sorted(glob.glob(spec))
    if not paths:
        raise FileNotFoundError(f"no .tar shards found for {spec!r}")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"shard not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    return paths


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the file name, rest = field."""
    folder, base = os.path.split(name)
    stem, _, field = base.partition(".")
    return os.path.join(folder, stem), field.lower()


def caption_of(fields: dict[str, bytes]) -> str:
    """The caption of a sample's members: ``txt``, else the ``caption`` of ``json``; '' if none."""
    if "txt" in fields:
        return fields["txt"].decode("utf-8", errors="replace").strip()
    if "json" in fields:
        try:
            meta = json.loads(fields["json"])
        except ValueError:
            return ""
        caption = meta.get("caption", "") if isinstance(meta, dict) else ""
        return caption.strip() if isinstance(caption, str) else ""
    return ""


class TarShards(torch.utils.data.IterableDataset):
    """Pairs from WebDataset-style shards: members sharing a key (``000123.jpg``,
    ``000123.txt`` or ``000123.json`` with a ``caption``) form one sample.

    Same items and ``skipped`` counts as :class:`ImageTextFolder`; a sample with no image
    member counts as ``corrupt_image``; an unreadable shard counts as ``corrupt_shard``.
    """

    def __init__(self, shards: str | Sequence[str], size: int | None = 96, entities: EntityFn | None = None):
        self.paths = expand_shards(shards)
        self.size = size
        self.entities = entities
        self.skipped: Counter = Counter()

    def __iter__(self) -> Iterator[dict]:
        self.skipped = Counter()
        for path in self.paths:
            try:
                yield from self._read(path)
            except (tarfile.TarError, OSError):
                self.skipped["corrupt_shard"] += 1

    def _read(self, path: str) -> Iterator[dict]:
        key, fields = None, {}
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, field = _split_key(member.name)
                if member_key != key:
                    if key is not None:
                        yield from self._emit(fields)
                    key, fields = member_key, {}
                fields[field] = tar.extractfile(member).read()
        if key is not None:
            yield from self._emit(fields)

    def _emit(self, fields: dict[str, bytes]) -> Iterator[dict]:
        sample = decode_fields(fields, self.size, self.entities, self.skipped)
        if sample is not None:
            yield sample


def decode_fields(fields: dict, size: int | None, entities: EntityFn | None, skipped: Counter) -> dict | None:
    """One sample from the members of a WebDataset-style sample (field name -> bytes), or
    None after counting why in ``skipped`` (``missing_caption``, ``corrupt_image``)."""
    caption = caption_of(fields)
    if not caption:
        skipped["missing_caption"] += 1
        return None
    image_field = next((f for f in fields if "." + f.lower() in IMAGE_EXTENSIONS), None)
    try:
        if image_field is None:
            raise ValueError("no image member")
        image = decode_image(fields[image_field], size)
    except (OSError, ValueError, SyntaxError):
        skipped["corrupt_image"] += 1
        return None
    return _sample(image, caption, entities)


class PairList(torch.utils.data.Dataset):
    """A map-style data set holding the samples of an iterable reader (for training)."""

    def __init__(self, source: torch.utils.data.IterableDataset, limit: int | None = None):
        self.samples = []
        for sample in source:
            if limit is not None and len(self.samples) >= limit:
                break
            self.samples.append(sample)
        self.skipped = Counter(getattr(source, "skipped", {}))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]
