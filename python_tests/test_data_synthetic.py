"""The procedural data set: determinism, masks, captions, held-out combinations."""

import numpy as np
import torch

from mgccl_ops.data.collate import StepBatchSampler, collate_pairs
from mgccl_ops.data.synthetic import (
    COLOURS,
    SHAPES,
    SyntheticShapes,
    all_combos,
    is_heldout,
    render_sample,
    split_combos,
    vocabulary_words,
)
from mgccl_ops.models.tokenizer import split_words


def test_samples_are_a_pure_function_of_seed_split_and_index():
    a, b = SyntheticShapes("train", 50, seed=3), SyntheticShapes("train", 50, seed=3)
    for i in (0, 7, 49, 7):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
        assert x["caption"] == y["caption"] and x["entities"] == y["entities"]
    assert not torch.equal(a[0]["image"], SyntheticShapes("train", 50, seed=4)[0]["image"])
    assert not torch.equal(a[1]["image"], a[2]["image"])


def test_shapes_and_dtypes():
    item = SyntheticShapes("val", 3, size=96)[2]
    assert item["image"].shape == (3, 96, 96) and item["image"].dtype == torch.uint8
    assert item["mask"].shape == (96, 96) and item["mask"].dtype == torch.int64


def test_masks_match_entities_and_rendered_colours():
    for index in range(40):
        sample = render_sample(0, "train", index)
        ids = sorted(set(np.unique(sample.mask).tolist()) - {0})
        named = [all_combos()[i - 1] for i in ids]
        object_phrases = [e for e in sample.entities if not e.endswith("background")]
        assert sorted(f"{c} {s}" for c, s in named) == sorted(object_phrases)
        assert 1 <= len(ids) <= 3
        for i, (colour, _) in zip(ids, named, strict=True):
            pixels = sample.image[sample.mask == i].astype(float).mean(0)
            assert np.abs(pixels - np.array(COLOURS[colour])).max() < 45, (colour, pixels)
        assert (sample.mask == 0).mean() > 0.3


def test_every_entity_is_named_in_its_caption():
    for index in range(60):
        sample = render_sample(1, "heldout", index)
        words = set(split_words(sample.caption))
        for phrase in sample.entities:
            assert set(phrase.split()) <= words, (phrase, sample.caption)
        assert set(split_words(sample.caption)) <= set(vocabulary_words())


def test_captions_vary_and_sometimes_name_the_background():
    samples = [render_sample(0, "train", i) for i in range(200)]
    assert len({" ".join(s.caption.split()[:2]) for s in samples}) >= 10
    with_bg = sum(any(e.endswith("background") for e in s.entities) for s in samples)
    assert 20 < with_bg < 120


def test_heldout_combinations_never_occur_in_training():
    train, held = set(split_combos("train")), set(split_combos("heldout"))
    assert not train & held and len(train | held) == len(COLOURS) * len(SHAPES)
    for colour in COLOURS:
        assert sum(c == colour for c, _ in held) == 2
    ds = SyntheticShapes("train", 300)
    seen = {ds.class_names[k] for i in range(300) for k in ds[i]["mask"].unique().tolist() if k}
    assert all(not is_heldout(*name.split()) for name in seen)
    held_ds = SyntheticShapes("heldout", 50)
    assert held_ds.class_names[0] == "background"
    assert all(is_heldout(*name.split()) for name in held_ds.class_names[1:])


def test_collate_gives_equal_ids_to_equal_phrases():
    samples = [
        {
            "image": torch.zeros(3, 4, 4, dtype=torch.uint8),
            "caption": "c0",
            "entities": ["red star", "blue ring"],
        },
        {"image": torch.zeros(3, 4, 4, dtype=torch.uint8), "caption": "c1", "entities": ["blue ring"]},
    ]
    batch = collate_pairs(samples)
    assert batch["phrases"] == ["red star", "blue ring"]
    assert batch["entity_ids"].tolist() == [[0, 1], [1, -1]]
    assert batch["images"].shape == (2, 3, 4, 4) and "masks" not in batch


def test_step_batches_depend_only_on_seed_and_step():
    full = list(StepBatchSampler(1000, 8, seed=5, start=0, stop=6))
    tail = list(StepBatchSampler(1000, 8, seed=5, start=4, stop=6))
    assert tail == full[4:] and len(full) == 6 and full[0] != full[1]
