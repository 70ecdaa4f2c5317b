"""The small models, the word tokenizer and the open_clip adapter (tiny random models)."""

import open_clip
import pytest
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from mgccl_ops.models import OpenClipDualEncoder, SmallDualEncoder, WordTokenizer, build_model


def test_word_tokenizer_pads_truncates_and_marks_unknown_words():
    tok = WordTokenizer(["red", "circle", "a red star"], context_length=4)
    assert tok.words == ["a", "circle", "red", "star"] and tok.vocab_size == 6
    ids = tok(["A red, CIRCLE!", "red zebra star circle red"])
    assert ids.tolist() == [[2, 4, 3, 0], [4, 1, 5, 3]]
    again = WordTokenizer.from_state_dict(tok.state_dict())
    assert torch.equal(again(["red star"]), tok(["red star"]))


def test_small_dual_encoder_shapes_and_unit_norm():
    torch.manual_seed(0)
    model = SmallDualEncoder(["red", "blue", "circle"], dim=16)
    images = torch.randint(0, 256, (2, 3, 32, 40), dtype=torch.uint8)
    dense, glob, grid = model.encode_image(images)
    assert grid == (8, 10) and dense.shape == (2, 80, 16) and glob.shape == (2, 16)
    text = model.encode_text(["red circle", "blue", "unknown words only"])
    assert text.shape == (3, 16)
    for t in (dense, glob, text):
        assert torch.allclose(t.norm(dim=-1), torch.ones(t.shape[:-1]), atol=1e-5)
    rebuilt = build_model(model.describe())
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.encode_text(["red circle"]), model.encode_text(["red circle"]))


def test_bag_of_words_text_encoder_ignores_padding():
    model = SmallDualEncoder(["red", "circle"], dim=8, context_length=6)
    short, long, swapped = model.encode_text(["red circle", "red circle circle red", "circle red"])
    assert torch.allclose(short, long, atol=1e-6) and torch.allclose(short, swapped, atol=1e-6)
    assert not torch.allclose(short, model.encode_text(["red"])[0], atol=1e-3)


def _tiny_clip(vision: CLIPVisionCfg) -> open_clip.CLIP:
    torch.manual_seed(0)
    text = CLIPTextCfg(context_length=12, vocab_size=49408, width=32, heads=2, layers=1)
    return open_clip.CLIP(embed_dim=24, vision_cfg=vision, text_cfg=text)


@pytest.mark.parametrize(
    ("vision", "grid"),
    [
        (CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32), (4, 4)),
        (CLIPVisionCfg(layers=(1, 1, 1, 1), width=8, head_width=8, image_size=64), (2, 2)),
    ],
    ids=["vit", "modified_resnet"],
)
def test_open_clip_adapter_gives_dense_tokens_in_the_joint_space(vision, grid):
    clip = _tiny_clip(vision)
    size = vision.image_size
    model = OpenClipDualEncoder(clip, lambda t: open_clip.tokenize(t, context_length=12))
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    with torch.no_grad():
        dense, glob, got_grid = model.encode_image(images)
        text = model.encode_text(["a red circle", "a dog"])
    assert got_grid == grid and dense.shape == (2, grid[0] * grid[1], 24) and glob.shape == (2, 24)
    assert text.shape == (2, 24)
    with torch.no_grad():
        x = (images.float() - model.mean) / model.std
        expect_global = torch.nn.functional.normalize(clip.encode_image(x), dim=-1)
        expect_text = torch.nn.functional.normalize(clip.encode_text(open_clip.tokenize(["a red circle"], 12)), dim=-1)
    assert torch.allclose(glob, expect_global, atol=1e-5)
    assert torch.allclose(text[:1], expect_text, atol=1e-5)
    assert model.logit_scale is clip.logit_scale


def test_open_clip_adapter_rejects_unsupported_towers():
    clip = _tiny_clip(CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32))
    clip.visual = torch.nn.Identity()
    with pytest.raises(TypeError, match="supports VisionTransformer and ModifiedResNet towers, got Identity"):
        OpenClipDualEncoder(clip, open_clip.tokenize)
