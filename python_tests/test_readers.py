"""Readers on small fixture folders and tar shards that the tests create."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from mgccl_ops.data.benchmarks import BENCHMARKS, get_benchmark
from mgccl_ops.data.entities import ConceptVocabulary, singular_forms
from mgccl_ops.data.pairs import ImageTextFolder, PairList, TarShards, expand_shards
from mgccl_ops.data.segmentation import SegmentationFolder


def _png_bytes(array: np.ndarray, palette: bool = False) -> bytes:
    img = Image.fromarray(array)
    if palette:  # a grey image given a palette becomes a palette image with the same indices
        img.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
        assert img.mode == "P"
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


def _voc_fixture(root, stored_masks):
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    ids = []
    for i, mask in enumerate(stored_masks):
        Image.fromarray(_rgb(i, mask.shape[0])).save(root / "JPEGImages" / f"im{i}.jpg")
        (root / "SegmentationClass" / f"im{i}.png").write_bytes(_png_bytes(mask, palette=True))
        ids.append(f"im{i}")
    (root / "JPEGImages" / "bad.jpg").write_bytes(b"nope")
    (root / "SegmentationClass" / "bad.png").write_bytes(_png_bytes(stored_masks[0]))
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids + ["bad", "absent"]) + "\n")


def test_segmentation_folder_reads_palette_masks_with_voc_conventions(tmp_path):
    stored = np.array([[0, 1, 15, 255], [20, 0, 0, 3]] * 2, dtype=np.uint8)
    _voc_fixture(tmp_path, [stored])
    voc = SegmentationFolder(tmp_path, "voc", split="val")
    assert len(voc) == 1 and voc.skipped == {"corrupt_image": 1, "missing_file": 1}
    item = voc[0]
    assert item["image"].shape == (3, 4, 4) and torch.equal(item["mask"], torch.from_numpy(stored).long())
    assert voc.class_names[0] == "background" and voc.class_names[15] == "person"
    voc20 = SegmentationFolder(tmp_path, "voc20")
    expect = np.where(stored == 0, 255, np.where(stored == 255, 255, stored.astype(int) - 1))
    assert torch.equal(voc20[0]["mask"], torch.from_numpy(expect))
    assert voc20.class_names[14] == "person"
    resized = SegmentationFolder(tmp_path, "voc", size=8)[0]
    assert resized["image"].shape == (3, 8, 8) and resized["mask"].shape == (8, 8)
    assert set(resized["mask"].unique().tolist()) == {0, 1, 3, 15, 20, 255}


def test_benchmark_conventions():
    sizes = {"voc": 21, "voc20": 20, "context60": 60, "context59": 59, "coco_object": 81, "coco_stuff": 171,
             "cityscapes": 19, "ade20k": 150}  # fmt: skip
    assert {k: len(b.class_names) for k, b in BENCHMARKS.items()} == sizes
    for name, bench in BENCHMARKS.items():
        assert len(set(bench.class_names)) == len(bench.class_names), name
        assert bench.has_background == (bench.class_names[0] == "background"), name
    ade = get_benchmark("ade20k").convert_mask(torch.tensor([[0, 1, 150, 151]]))
    assert ade.tolist() == [[255, 0, 149, 255]]
    city = get_benchmark("cityscapes").convert_mask(torch.tensor([[0, 18, 19, 255]]))
    assert city.tolist() == [[0, 18, 255, 255]]
    with pytest.raises(ValueError, match="unknown benchmark 'pascal'"):
        get_benchmark("pascal")
