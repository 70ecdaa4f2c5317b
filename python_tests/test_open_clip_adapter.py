"""The open_clip adapter, on tiny randomly initialised open_clip models (no downloads)."""

import json

import benchmark_fixtures
import pytest
import torch

from mgccl_ops.backends import get_ops
from mgccl_ops.cli import main
from mgccl_ops.data.segmentation import SegmentationFolder
from mgccl_ops.evaluate.evaluator import EvalSettings, evaluate
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


def test_value_value_dense_tokens_follow_the_stated_formula():
    vision = CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=32)
    clip = _tiny_clip(vision).eval()
    model = OpenClipDualEncoder(clip, lambda t: open_clip.tokenize(t, context_length=12), dense="value_value")
    last = clip.visual.transformer.resblocks[-1]
    seen = {}
    handle = last.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    images = torch.randint(0, 256, (2, 3, 48, 40), dtype=torch.uint8)  # not the 32 x 32 it was built for
    with torch.no_grad():
        dense, glob, grid = model.encode_image(images)
    handle.remove()
    assert grid == (6, 5) and dense.shape == (2, 30, 24) and glob.shape == (2, 24)
    with torch.no_grad():  # the stated formula, written out per head
        y = last.ln_1(seen["x"])
        w_v, b_v = last.attn.in_proj_weight[64:], last.attn.in_proj_bias[64:]
        v = (y @ w_v.T + b_v).view(2, 31, 2, 16)
        heads = [torch.softmax(v[:, :, h] @ v[:, :, h].transpose(1, 2) / 16**0.5, -1) @ v[:, :, h] for h in range(2)]
        out = last.attn.out_proj(torch.cat(heads, -1))
        expect = torch.nn.functional.normalize(clip.visual.ln_post(out[:, 1:]) @ clip.visual.proj, dim=-1)
    assert torch.allclose(dense, expect, atol=1e-5)
    with pytest.raises(ValueError, match="dense must be one of"):
        OpenClipDualEncoder(clip, open_clip.tokenize, dense="qk")


TINY_CONFIG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture
def tiny_arch(tmp_path):
    """A tiny architecture registered with open_clip under a name (nothing is downloaded)."""
    config = tmp_path / "mgccl-tiny-vit.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    return "mgccl-tiny-vit"


def test_zero_shot_baseline_scores_a_random_open_clip_model_end_to_end(tmp_path, tiny_arch, capsys):
    torch.manual_seed(5)
    clip = open_clip.create_model(tiny_arch)
    weights = tmp_path / "tiny.pt"
    torch.save(clip.state_dict(), weights)
    loaded = OpenClipDualEncoder.from_name(tiny_arch, pretrained=str(weights), dense="value_value")
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), clip.state_dict().values()))
    root = tmp_path / "voc"
    benchmark_fixtures.build(root, "voc", shapes=((40, 56), (36, 36)))
    args = ["eval", "--model", f"open_clip:{tiny_arch}", "--pretrained", str(weights), "--benchmark", "voc",
            "--root", str(root), "--short-side", "40", "--window", "32", "--stride", "16", "--units", "pixel",
            "--backend", "reference", "--json", str(tmp_path / "scores.json")]  # fmt: skip
    assert main(args) == 0
    assert "per-pixel" in capsys.readouterr().out
    score = json.loads((tmp_path / "scores.json").read_text())["miou"]["pixel"]
    data = SegmentationFolder(root, "voc")
    settings = EvalSettings(units=("pixel",), short_side=40, window=32, stride=16, background_threshold=0.5)
    expect = evaluate(loaded.eval(), data, data.class_names, True, get_ops("reference"), settings).mean_iou()
    assert score == pytest.approx(expect["pixel"])  # the file's weights were the ones scored
    with pytest.raises(SystemExit, match="--pretrained file not found: .*absent.pt"):
        main(["eval", "--model", f"open_clip:{tiny_arch}", "--pretrained", str(tmp_path / "absent.pt"),
              "--benchmark", "voc", "--root", str(root)])  # fmt: skip
