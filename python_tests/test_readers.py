"""Readers on small fixture folders and tar shards that the tests create."""

import io
import json
import tarfile

import benchmark_fixtures
import numpy as np
import pytest
import torch
from PIL import Image

from mgccl_ops.data.benchmarks import BENCHMARKS, get_benchmark
from mgccl_ops.data.entities import ConceptVocabulary, singular_forms
from mgccl_ops.data.pairs import ImageTextFolder, PairList, TarShards, expand_shards
from mgccl_ops.data.segmentation import SegmentationFolder


def _png_bytes(array: np.ndarray) -> bytes:
    img = Image.fromarray(array)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _rgb(seed: int, size: int = 20) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


def test_concepts_match_plurals_and_multiword_phrases():
    vocab = ConceptVocabulary(["dog", "teddy bear", "bus", "puppy", "knife", "person", "traffic light", "glass"])
    caption = "Two Teddy Bears, three puppies and people near buses; knives, glasses and traffic lights. A dog!"
    assert vocab(caption) == [
        "teddy bear",
        "puppy",
        "person",
        "bus",
        "knife",
        "glass",
        "traffic light",
        "dog",
    ]
    assert vocab(caption, limit=2) == ["teddy bear", "puppy"]
    assert vocab("a bear and a teddy") == []
    assert "leaf" in singular_forms("leaves") and "box" in singular_forms("boxes")


def test_image_text_folder_skips_and_counts_bad_samples(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.fromarray(_rgb(0)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("two dogs on grass\n")
    Image.fromarray(_rgb(1)).save(tmp_path / "sub" / "b.jpg")
    (tmp_path / "sub" / "b.txt").write_text("a dog")
    Image.fromarray(_rgb(2)).save(tmp_path / "no_caption.png")
    (tmp_path / "empty.png").write_bytes(_png_bytes(_rgb(3)))
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "broken.txt").write_text("a broken dog")
    reader = ImageTextFolder(tmp_path, size=16, entities=ConceptVocabulary(["dog", "grass"]))
    samples = list(reader)
    assert [s["caption"] for s in samples] == ["two dogs on grass", "a dog"]
    assert samples[0]["entities"] == ["dog", "grass"]
    assert samples[0]["image"].shape == (3, 16, 16) and samples[0]["image"].dtype == torch.uint8
    assert reader.skipped == {"missing_caption": 2, "corrupt_image": 1}
    held = PairList(reader)
    assert len(held) == 2 and held.skipped["corrupt_image"] == 1


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found.*nowhere"):
        ImageTextFolder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        SegmentationFolder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="shard not found"):
        expand_shards(str(tmp_path / "data-{000..002}.tar"))


def _write_shard(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tar_shards_group_members_by_key(tmp_path):
    _write_shard(
        tmp_path / "data-000.tar",
        [
            ("x/000.jpg", _png_bytes(_rgb(0))),
            ("x/000.txt", b"a cat"),
            ("x/001.png", _png_bytes(_rgb(1))),
            ("x/001.json", json.dumps({"caption": "cats and a dog"}).encode()),
            ("x/002.jpg", _png_bytes(_rgb(2))),
            ("x/003.jpg", b"garbage"),
            ("x/003.txt", b"a broken cat"),
        ],
    )
    _write_shard(
        tmp_path / "data-001.tar",
        [("004.txt", b"only a caption"), ("005.jpg", _png_bytes(_rgb(5))), ("005.txt", b"dog")],
    )
    (tmp_path / "data-002.tar").write_bytes(b"not a tar file at all" * 50)
    reader = TarShards(str(tmp_path / "data-{000..002}.tar"), size=8, entities=ConceptVocabulary(["cat", "dog"]))
    samples = list(reader)
    assert [s["caption"] for s in samples] == ["a cat", "cats and a dog", "dog"]
    assert samples[1]["entities"] == ["cat", "dog"] and samples[2]["image"].shape == (3, 8, 8)
    assert reader.skipped == {"missing_caption": 1, "corrupt_image": 2, "corrupt_shard": 1}
    assert len(TarShards(str(tmp_path), size=8).paths) == 3


def _expected_labels(benchmark: str, stored: np.ndarray) -> np.ndarray:
    """Each benchmark's evaluation labels, written out independently of the reader."""
    s = stored.astype(np.int64)
    if benchmark in ("voc20", "context59", "ade20k"):
        return np.where((s == 0) | (s == 255), 255, s - 1)
    if benchmark == "cityscapes":
        train = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
        return np.vectorize(lambda v: train.get(int(v), 255))(s)
    return s


@pytest.mark.parametrize("benchmark", sorted(BENCHMARKS))
def test_every_benchmark_layout_reads_at_original_size(tmp_path, benchmark):
    stored = benchmark_fixtures.build(tmp_path, benchmark)
    data = SegmentationFolder(tmp_path, benchmark)
    assert len(data) == len(stored) and not data.skipped
    for item, mask in zip(data, stored, strict=True):
        assert item["image"].shape == (3, *mask.shape) and item["image"].dtype == torch.uint8
        assert torch.equal(item["mask"], torch.from_numpy(_expected_labels(benchmark, mask)))
    assert data.class_names == list(get_benchmark(benchmark).class_names)


def test_voc_skips_missing_and_corrupt_samples_and_reads_palette_indices(tmp_path):
    stored = benchmark_fixtures.build(tmp_path, "voc")
    (tmp_path / "JPEGImages" / "bad.jpg").write_bytes(b"nope")
    benchmark_fixtures.save_mask(tmp_path / "SegmentationClass" / "bad.png", stored[0])
    split = tmp_path / "ImageSets" / "Segmentation" / "val.txt"
    split.write_text(split.read_text() + "bad\nabsent\n")
    voc = SegmentationFolder(tmp_path, "voc", split="val")
    assert len(voc) == 2 and voc.skipped == {"corrupt_image": 1, "missing_file": 1}
    with Image.open(tmp_path / "SegmentationClass" / "img0.png") as png:
        assert png.mode == "P"  # palette PNG as VOC ships; its indices are the labels
    assert torch.equal(voc[0]["mask"], torch.from_numpy(stored[0]).long())
    assert voc.class_names[0] == "background" and voc.class_names[15] == "person"
    assert SegmentationFolder(tmp_path, "voc20").class_names[14] == "person"


def test_rgb_mask_is_an_error_naming_the_file(tmp_path):
    stored = benchmark_fixtures.build(tmp_path, "voc")
    rgb = tmp_path / "SegmentationClass" / "img1.png"
    Image.fromarray(np.stack([stored[1]] * 3, -1)).save(rgb)  # was: channel 0 kept, scored 100
    with pytest.raises(ValueError, match=r"mask .*img1\.png is a 'RGB' image.*single-channel class ids"):
        SegmentationFolder(tmp_path, "voc")


@pytest.mark.parametrize(("benchmark", "value"), [("voc", 21), ("ade20k", 151), ("cityscapes", 34)])
def test_values_that_are_not_class_ids_are_an_error_naming_the_file(tmp_path, benchmark, value):
    benchmark_fixtures.build(tmp_path, benchmark)
    data = SegmentationFolder(tmp_path, benchmark)
    path = data.items[0][1]
    with Image.open(path) as png:
        bad = np.asarray(png).copy()
    bad[0, 0] = value
    benchmark_fixtures.save_mask(path, bad)
    with pytest.raises(ValueError, match=rf"{path.name}: label values \[{value}\] are not {benchmark} class ids"):
        data[0]


def test_missing_split_file_or_folder_is_an_error(tmp_path):
    benchmark_fixtures.build(tmp_path / "voc", "voc")
    with pytest.raises(FileNotFoundError, match=r"split file not found: .*ImageSets/Segmentation/test\.txt"):
        SegmentationFolder(tmp_path / "voc", "voc", split="test")  # was: every mask scored silently
    benchmark_fixtures.build(tmp_path / "ade", "ade20k")
    with pytest.raises(FileNotFoundError, match=r"ade20k folder not found: .*images/training"):
        SegmentationFolder(tmp_path / "ade", "ade20k", split="training")


def test_benchmark_conventions():
    sizes = {"voc": 21, "voc20": 20, "context60": 60, "context59": 59, "coco_object": 81, "coco_stuff": 171,
             "cityscapes": 19, "ade20k": 150}  # fmt: skip
    assert {k: len(b.class_names) for k, b in BENCHMARKS.items()} == sizes
    for name, bench in BENCHMARKS.items():
        assert len(set(bench.class_names)) == len(bench.class_names), name
        assert bench.has_background == (bench.class_names[0] == "background"), name
    ade = get_benchmark("ade20k").convert_mask(torch.tensor([[0, 1, 150, 255]]))
    assert ade.tolist() == [[255, 0, 149, 255]]
    city = get_benchmark("cityscapes").convert_mask(torch.tensor([[0, 7, 33, 255, 6]]))
    assert city.tolist() == [[255, 0, 18, 255, 255]]
    with pytest.raises(ValueError, match=r"label values \[151\]"):
        get_benchmark("ade20k").convert_mask(torch.tensor([[151]]))
    with pytest.raises(ValueError, match="unknown benchmark 'pascal'"):
        get_benchmark("pascal")
