"""adaptive_semantic_unit (DESIGN.md op 5) against the plain-PyTorch reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from compare import assert_close

import mgccl_ops
from mgccl_ops import reference


def inputs(dtype=torch.float64, shape=(2, 6, 9, 7), texts=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixel_feat = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
    text_emb = torch.randn(texts, shape[1], generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
    return pixel_feat, text_emb


@pytest.mark.parametrize("threshold", ["auto", 0.2, -1.0])
@pytest.mark.parametrize("linkage", ["average", "single"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_equals_reference(threshold, linkage, dtype):
    pixel_feat, text_emb = inputs(dtype)
    out = mgccl_ops.adaptive_semantic_unit(pixel_feat, text_emb, threshold=threshold, linkage=linkage)
    ref = reference.adaptive_semantic_unit(pixel_feat, text_emb, threshold=threshold, linkage=linkage)
    assert out.shape == (2, 5, 9, 7) and out.dtype == dtype
    assert_close(out, ref, dtype, "logits")
    upstream = torch.randn(out.shape, dtype=dtype)
    grads = torch.autograd.grad(out, (pixel_feat, text_emb), upstream)
    ref_grads = torch.autograd.grad(ref, (pixel_feat, text_emb), upstream)
    for name, grad, ref_grad in zip(("grad pixel_feat", "grad text_emb"), grads, ref_grads, strict=True):
        assert_close(grad, ref_grad, dtype, name)


def test_between_pixel_and_image_units():
    pixel_feat, text_emb = inputs()
    per_pixel = torch.einsum("bchw,tc->bthw", F.normalize(pixel_feat, dim=1), F.normalize(text_emb, dim=1))
    torch.testing.assert_close(mgccl_ops.adaptive_semantic_unit(pixel_feat, text_emb, threshold=1.5), per_pixel)
    per_image = mgccl_ops.adaptive_semantic_unit(pixel_feat, text_emb, threshold=-1.0)
    torch.testing.assert_close(per_image, per_pixel.mean((2, 3), keepdim=True).expand_as(per_pixel))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_guide_equals_reference(dtype):
    pixel_feat, text_emb = inputs(dtype)
    colour = torch.rand(2, 3, 9, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    guide = torch.cat([pixel_feat.detach(), 4 * colour.to(dtype)], 1)
    out = mgccl_ops.adaptive_semantic_unit(pixel_feat, text_emb, threshold=0.5, guide=guide)
    ref = reference.adaptive_semantic_unit(pixel_feat, text_emb, threshold=0.5, guide=guide)
    assert_close(out, ref, dtype, "logits")
    unguided = mgccl_ops.adaptive_semantic_unit(pixel_feat, text_emb, threshold=0.5)
    assert not torch.allclose(out, unguided), "the colour channels should change the regions"
    same = mgccl_ops.adaptive_semantic_unit(pixel_feat, text_emb, threshold=0.5, guide=pixel_feat.detach())
    torch.testing.assert_close(same, unguided)


def test_guide_regions_follow_the_guide():
    """Features that are all alike and a guide with two halves: two units, one per half."""
    pixel_feat = torch.randn(1, 4, 6, 8, dtype=torch.float64) * 0.01 + 1
    text_emb = torch.randn(3, 4, dtype=torch.float64)
    guide = torch.zeros(1, 2, 6, 8, dtype=torch.float64)
    guide[:, 0, :, :4], guide[:, 1, :, 4:] = 1, 1
    out = mgccl_ops.adaptive_semantic_unit(pixel_feat, text_emb, threshold=0.5, guide=guide)
    assert out[..., :4].unique(dim=-1).shape[-1] == 1 and out[..., 4:].unique(dim=-1).shape[-1] == 1
    assert not torch.allclose(out[..., 0], out[..., 7])


def test_gradcheck():
    pixel_feat, text_emb = inputs(shape=(1, 3, 4, 5), texts=2)
    torch.autograd.gradcheck(
        lambda p, t: mgccl_ops.adaptive_semantic_unit(p, t, threshold=0.3, linkage="single"), (pixel_feat, text_emb)
    )


def test_bad_input():
    pixel_feat, text_emb = inputs()
    with pytest.raises(ValueError, match=r"text_emb.shape\[1\] should equal pixel_feat.shape\[1\] \(C\) = 6"):
        mgccl_ops.adaptive_semantic_unit(pixel_feat, text_emb[:, :4])
    with pytest.raises(ValueError, match=r"text_emb has dtype torch.float32 but pixel_feat has dtype torch.float64"):
        mgccl_ops.adaptive_semantic_unit(pixel_feat, text_emb.float())
    with pytest.raises(ValueError, match=r"pixel_feat should be a 4-D tensor"):
        mgccl_ops.adaptive_semantic_unit(pixel_feat[0], text_emb)
    with pytest.raises(
        ValueError, match=r"guide must be \[B, C', H, W\] with pixel_feat's B, H, W = 2, 9, 7; got \(2, 3, 9, 6\)"
    ):
        mgccl_ops.adaptive_semantic_unit(pixel_feat, text_emb, guide=torch.zeros(2, 3, 9, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"guide should be a 4-D tensor"):
        mgccl_ops.adaptive_semantic_unit(pixel_feat, text_emb, guide=torch.zeros(2, 9, 7, dtype=torch.float64))
