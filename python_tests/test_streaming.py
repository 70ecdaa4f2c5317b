"""Streamed readers (mgccl_ops.data.stream) on tar shards and folders the tests create."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from itertools import islice

import pytest
import torch
from PIL import Image

from mgccl_ops.data.collate import StepBatchSampler
from mgccl_ops.data.rank_sampler import RankStepBatchSampler
from mgccl_ops.data.stream import PairStream, StreamPosition, collate_stream, expand_shard_spec


def _png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 10), (20 * i % 256, 80, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shards(folder, shards: int = 6, per_shard: int = 4) -> set[str]:
    """``data-000.tar`` ... with ``per_shard`` good samples each, plus in shard 1 a sample whose
    image does not decode and in shard 2 one without a caption; ``data-{shards}.tar`` is not a
    tar at all. Returns the captions of the good samples."""
    good = set()
    for s in range(shards):
        with tarfile.open(folder / f"data-{s:03d}.tar", "w") as tar:
            for j in range(per_shard):
                key = f"s{s}_{j:02d}"
                _add(tar, f"{key}.png", _png(s * per_shard + j))
                _add(tar, f"{key}.txt", f"caption {key}".encode())
                good.add(f"caption {key}")
            if s == 1:
                _add(tar, "broken.jpg", b"not an image")
                _add(tar, "broken.txt", b"a broken image")
            if s == 2:
                _add(tar, "mute.png", _png(0))
    (folder / f"data-{shards:03d}.tar").write_bytes(b"\x00garbage" * 100)
    return good


def _read(stream: PairStream, workers: int) -> tuple[list[str], Counter]:
    loader = torch.utils.data.DataLoader(stream, batch_size=2, collate_fn=collate_stream, num_workers=workers)
    captions, position = [], StreamPosition()
    for batch in loader:
        captions += batch["captions"]
        position.update(batch["stream"])
    return captions, Counter(position.skipped())


def test_epoch_split_over_two_ranks_and_two_workers_reads_every_sample_once(tmp_path):
    good = make_shards(tmp_path)
    spec = str(tmp_path / "data-{000..006}.tar")
    captions, skipped = [], Counter()
    for rank in range(2):
        stream = PairStream("shards", spec, size=8, resample=False, rank=rank, world=2, shuffle_buffer=3, seed=5)
        mine, counts = _read(stream, workers=2)
        captions += mine
        skipped += counts
    assert len(captions) == len(set(captions)), Counter(c for c in captions if captions.count(c) > 1)
    assert set(captions) == good
    assert skipped == Counter(corrupt_image=1, missing_caption=1, corrupt_shard=1)


def test_each_rank_and_worker_reads_its_own_shards(tmp_path):
    make_shards(tmp_path, shards=4, per_shard=2)
    spec = str(tmp_path / "data-{000..003}.tar")
    seen = {}
    for rank in range(2):
        stream = PairStream("shards", spec, size=8, resample=False, rank=rank, world=2, shuffle_buffer=0)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        for sample in loader:
            shard = sample["caption"].split()[1].split("_")[0]
            seen.setdefault(shard, set()).add((rank, sample["stream"]["worker"]))
    assert len(seen) == 4 and all(len(owners) == 1 for owners in seen.values())
    assert len(set().union(*seen.values())) == 4


def test_shuffle_buffer_reorders_within_reach(tmp_path):
    make_shards(tmp_path, shards=2, per_shard=8)
    spec = str(tmp_path / "data-{000..001}.tar")
    plain = [s["caption"] for s in PairStream("shards", spec, size=8, resample=False, shuffle_buffer=0, seed=1)]
    shuffled = [s["caption"] for s in PairStream("shards", spec, size=8, resample=False, shuffle_buffer=6, seed=1)]
    again = [s["caption"] for s in PairStream("shards", spec, size=8, resample=False, shuffle_buffer=6, seed=1)]
    assert sorted(plain) == sorted(shuffled) and plain != shuffled and shuffled == again


def test_samples_are_read_and_decoded_lazily_within_the_shuffle_buffer(tmp_path, monkeypatch):
    """Nothing is held beyond the shuffle buffer: after k samples came out of an endless
    (resampled) stream, at most k + buffer + 1 samples were read from the tars and at most
    k + 1 decoded (one of look-ahead)."""
    from mgccl_ops.data import stream as stream_module

    make_shards(tmp_path, shards=3, per_shard=6)
    decoded, read = [0], [0]
    decode = stream_module.decode_fields

    def counting_decode(*args, **kwargs):
        decoded[0] += 1
        return decode(*args, **kwargs)

    raw_samples = PairStream._raw_samples

    def counting_raw_samples(self, shards, skipped):
        for raw in raw_samples(self, shards, skipped):
            read[0] += 1
            yield raw

    monkeypatch.setattr(stream_module, "decode_fields", counting_decode)
    monkeypatch.setattr(PairStream, "_raw_samples", counting_raw_samples)
    buffer = 5
    samples = PairStream("shards", str(tmp_path / "data-{000..002}.tar"), size=8, shuffle_buffer=buffer)
    for out, sample in enumerate(islice(samples, 60), start=1):
        bad = sum(sample["stream"]["skipped"].values())  # bad samples are decoded (tried) too
        assert decoded[0] <= out + 1 + bad, (out, decoded[0], bad)
        assert read[0] <= decoded[0] + buffer, (out, read[0], decoded[0])
    assert out == 60 and read[0] > 3 * 6, read  # more than one pass over the shards was streamed


def test_resampling_streams_past_one_epoch_deterministically(tmp_path):
    good = make_shards(tmp_path, shards=3, per_shard=3)
    spec = str(tmp_path / "data-{000..002}.tar")
    first = [s["caption"] for s in islice(PairStream("shards", spec, size=8, seed=2, shuffle_buffer=4), 30)]
    second = [s["caption"] for s in islice(PairStream("shards", spec, size=8, seed=2, shuffle_buffer=4), 30)]
    other_rank = PairStream("shards", spec, size=8, seed=2, shuffle_buffer=4, rank=1, world=2)
    third = [s["caption"] for s in islice(other_rank, 30)]
    assert len(first) == 30 and set(first) <= good and len(set(first)) < 30
    assert first == second and first != third


def test_resumed_stream_continues_where_the_position_says(tmp_path):
    make_shards(tmp_path, shards=3, per_shard=4)
    stream = PairStream("shards", str(tmp_path), size=8, seed=3, shuffle_buffer=5)
    whole = list(islice(stream, 20))
    position = StreamPosition()
    for sample in whole[:7]:
        position.update(sample["stream"])
    rest = list(islice(stream.resumed_at(position.workers), 13))
    assert [s["caption"] for s in rest] == [s["caption"] for s in whole[7:]]
    assert rest[-1]["stream"] == whole[-1]["stream"]


def test_folder_streams_and_counts_bad_samples(tmp_path):
    for i, caption in enumerate(["a dog", "two cats", "grass"]):
        Image.new("RGB", (9, 7), (40 * i, 90, 20)).save(tmp_path / f"{i}.jpg")
        (tmp_path / f"{i}.txt").write_text(caption)
    (tmp_path / "lonely.jpg").write_bytes(b"broken")
    (tmp_path / "bad.png").write_bytes(b"broken")
    (tmp_path / "bad.txt").write_text("a bad image")
    stream = PairStream("folder", str(tmp_path), size=8, resample=False, shuffle_buffer=2)
    captions, skipped = _read(stream, workers=0)
    assert sorted(captions) == ["a dog", "grass", "two cats"]
    assert skipped == Counter(missing_caption=1, corrupt_image=1)


def test_brace_glob_and_missing_shards(tmp_path):
    make_shards(tmp_path, shards=2, per_shard=1)
    assert len(expand_shard_spec(str(tmp_path / "data-{000..001}.tar"))) == 2
    assert len(expand_shard_spec(str(tmp_path / "data-{000,001}.tar"))) == 2
    assert len(expand_shard_spec(str(tmp_path / "data-00*.tar"))) == 3
    with pytest.raises(FileNotFoundError, match="shard not found"):
        expand_shard_spec(str(tmp_path / "data-{000..004}.tar"))
    with pytest.raises(ValueError, match="kind"):
        PairStream("zip", str(tmp_path))


def test_rank_sampler_splits_each_global_batch_and_matches_one_process():
    one = list(RankStepBatchSampler(50, 4, seed=3, start=2, stop=5))
    assert one == list(StepBatchSampler(50, 4, seed=3, start=2, stop=5))
    ranks = [list(RankStepBatchSampler(50, 4, 3, 2, 5, rank=r, world=2, accum_steps=3)) for r in range(2)]
    assert all(len(r) == 9 for r in ranks)
    for step in range(3):
        global_batch = torch.randint(50, (24,), generator=torch.Generator().manual_seed(3 * 1_000_003 + 2 + step))
        pieces = [ranks[r][step * 3 + micro] for micro in range(3) for r in range(2)]
        assert sum(pieces, []) == global_batch.tolist()
