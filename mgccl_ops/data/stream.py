"""Streamed image-caption pairs: WebDataset shards or an image + .txt folder, decoded one
sample at a time in the DataLoader workers, split across ranks and workers.

Per worker the stages are: shard (or file) list -> split by rank and by worker (or, with
``resample``, an endless draw of shards with replacement seeded per rank and worker,
``webdataset.ResampledShards``) -> tar members grouped into samples
(``webdataset.tarfile_to_samples``) -> shuffle buffer (``webdataset.shuffle``) -> skip the
samples a resumed run already consumed -> decode. Nothing is held beyond the shuffle buffer
of undecoded samples. Bad samples (no caption, an image that does not decode, an unreadable
shard) are skipped and counted per worker; every sample carries its worker's position and
counts, so the trainer can checkpoint the stream position and log the counts.
"""

from __future__ import annotations

import copy
import os
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import webdataset as wds

from .collate import collate_pairs
from .images import IMAGE_EXTENSIONS
from .pairs import EntityFn, caption_of, decode_fields, expand_shards

KINDS = ("shards", "folder")


def expand_shard_spec(spec: str) -> list[str]:
    """Shard paths from a folder, a glob, or a brace pattern (``{000..099}``, ``{a,b}``;
    expanded by webdataset).

    Raises:
        FileNotFoundError: a named shard does not exist, or nothing matches.
    """
    if os.path.isdir(spec) or any(ch in spec for ch in "*?["):
        return expand_shards(spec)
    return expand_shards(wds.shardlists.expand_urls(spec))


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class PairStream(torch.utils.data.IterableDataset):
    """Image-caption samples streamed from ``shards`` (WebDataset .tar files) or a
    ``folder`` (``name.<image ext>`` + ``name.txt``), as dicts with ``image`` uint8
    [3, size, size], ``caption``, ``entities`` and ``stream`` (the worker's position).

    Args:
        kind: ``"shards"`` or ``"folder"``.
        spec: shard pattern / folder / glob, or the folder of pairs.
        size: side images are resized to.
        entities: caption -> entity phrases (e.g. a ``ConceptVocabulary``).
        seed: seeds the shard order, the shuffle buffer and the resampling.
        shuffle_buffer: samples held (undecoded) for shuffling; 0 keeps the order.
        resample: endless stream of shards drawn with replacement per rank and worker (for
            training); False: one epoch, shards split by rank then by worker, so every
            sample is read exactly once over all ranks and workers.
        rank, world: this process's place; default from torch.distributed or the
            ``RANK`` / ``WORLD_SIZE`` environment.
    """

    def __init__(
        self,
        kind: str,
        spec: str,
        *,
        size: int | None = 96,
        entities: EntityFn | None = None,
        seed: int = 0,
        shuffle_buffer: int = 256,
        resample: bool = True,
        rank: int | None = None,
        world: int | None = None,
    ):
        if kind not in KINDS:
            raise ValueError(f"PairStream: kind should be one of {KINDS}, got {kind!r}")
        if kind == "folder":
            root = Path(spec)
            if not root.is_dir():
                raise FileNotFoundError(f"image-caption folder not found: {root}")
            self.urls = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not self.urls:
                raise FileNotFoundError(f"no images found under {root}")
        else:
            self.urls = expand_shard_spec(spec)
        self.kind, self.size, self.entities, self.seed = kind, size, entities, seed
        self.shuffle_buffer, self.resample = shuffle_buffer, resample
        default_rank, default_world = _rank_and_world()
        self.rank = default_rank if rank is None else rank
        self.world = default_world if world is None else world
        self.start: dict[int, dict] = {}

    def resumed_at(self, workers: dict[int, dict] | None) -> PairStream:
        """A copy that continues from a :class:`StreamPosition`'s ``workers`` (None: start)."""
        other = copy.copy(self)
        other.start = {int(w): dict(s) for w, s in (workers or {}).items()}
        return other

    def captions(self, limit: int) -> list[str]:
        """The captions of up to ``limit`` samples in shard order (no image is decoded)."""
        found = []
        for raw in self._raw_samples(iter({"url": u} for u in self.urls), Counter()):
            caption = self._caption(raw)
            if caption:
                found.append(caption)
            if len(found) >= limit:
                break
        return found

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        start = self.start.get(worker, {})
        skipped = Counter(start.get("skipped", {}))
        cursor, resume_at = 0, int(start.get("cursor", 0))
        samples = self._raw_samples(self._shards(worker, workers), skipped)
        if self.shuffle_buffer > 0:
            seed = wds.utils.make_seed(self.seed, self.rank, worker)
            samples = wds.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 64), seed=seed)(samples)
        # One decoded sample of look-ahead: a sample goes out once the next good one is found
        # (or the stream ends), carrying the position just before that one, so the bad
        # samples between them are counted in its state and skipped, not recounted, on resume.
        waiting = None
        for raw in samples:
            cursor += 1
            if cursor <= resume_at:
                continue
            sample = self._decode(raw, skipped)
            if sample is None:
                continue
            if waiting is not None:
                waiting["stream"] = {"worker": worker, "cursor": cursor - 1, "skipped": dict(skipped)}
                yield waiting
            waiting = sample
        if waiting is not None:
            waiting["stream"] = {"worker": worker, "cursor": cursor, "skipped": dict(skipped)}
            yield waiting

    def _shards(self, worker: int, workers: int) -> Iterator[dict]:
        if self.resample:
            seed = wds.utils.make_seed(self.rank, worker)
            yield from wds.ResampledShards(self.urls, seed=self.seed, worker_seed=lambda: seed, deterministic=True)
            return
        order = list(self.urls)
        random.Random(self.seed).shuffle(order)
        mine = order[self.rank :: self.world][worker::workers]
        yield from ({"url": url} for url in mine)

    def _raw_samples(self, shards: Iterator[dict], skipped: Counter) -> Iterator[dict]:
        if self.kind == "folder":
            yield from ({"__key__": s["url"], "path": s["url"]} for s in shards)
            return

        def unreadable(error: Exception) -> bool:
            skipped["corrupt_shard"] += 1
            return True

        yield from wds.tarfile_to_samples(handler=unreadable)(shards)

    def _caption(self, raw: dict) -> str:
        if self.kind == "folder":
            text = Path(raw["path"]).with_suffix(".txt")
            return text.read_text(errors="replace").strip() if text.is_file() else ""
        return caption_of({k: v for k, v in raw.items() if not k.startswith("__")})

    def _decode(self, raw: dict, skipped: Counter) -> dict | None:
        if self.kind == "folder":
            caption = self._caption(raw)
            if not caption:
                skipped["missing_caption"] += 1
                return None
            path = Path(raw["path"])
            fields = {"txt": caption.encode(), path.suffix.lower().lstrip("."): path.read_bytes()}
        else:
            fields = {k: v for k, v in raw.items() if not k.startswith("__")}
        return decode_fields(fields, self.size, self.entities, skipped)


class StreamPosition:
    """The latest ``stream`` state of each DataLoader worker seen by the trainer: where each
    worker is (``cursor``: samples it has taken from its shuffle buffer) and its counts of
    skipped samples. ``workers`` goes into checkpoints; :meth:`PairStream.resumed_at`
    continues from it."""

    def __init__(self, workers: dict | None = None):
        self.workers: dict[int, dict] = {int(w): dict(s) for w, s in (workers or {}).items()}

    def update(self, state: dict | None) -> None:
        if state is not None:
            self.workers[int(state["worker"])] = {"cursor": state["cursor"], "skipped": state["skipped"]}

    def skipped(self) -> dict[str, int]:
        """Skipped samples of this rank, by reason, summed over its workers."""
        return dict(sum((Counter(s["skipped"]) for s in self.workers.values()), Counter()))


def collate_stream(samples: list[dict]) -> dict:
    """:func:`collate_pairs` plus ``stream``: the state of the worker after the last sample."""
    batch = collate_pairs(samples)
    batch["stream"] = samples[-1]["stream"] if samples else None
    return batch
