"""The open_clip adapter, on tiny randomly initialised open_clip models (no downloads)."""

import pytest
import torch

from mgccl_ops.models import OpenClipDualEncoder

open_clip = pytest.importorskip("open_clip", reason="open_clip is the optional 'openclip' extra")
from open_clip.model import CLIPTextCfg, CLIPVisionCfg  # noqa: E402


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
