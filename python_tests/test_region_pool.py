"""region_pool and region_broadcast (DESIGN.md op 5) against the plain-PyTorch reference."""

from __future__ import annotations

import pytest
import torch
from compare import assert_close
from hypothesis import given
from hypothesis import strategies as st

import mgccl_ops
from mgccl_ops import reference

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1, 1, 1), (1, 3, 1, 17), (2, 4, 13, 1), (2, 5, 7, 3), (3, 16, 24, 20)]


def random_regions(batch, height, width, seed=0, max_regions=6) -> tuple[torch.Tensor, torch.Tensor]:
    """labels [B, H, W] drawn at random below num [B]; some regions have no pixels."""
    generator = torch.Generator().manual_seed(seed)
    num = torch.randint(1, max_regions + 1, (batch,), generator=generator)
    labels = (torch.rand(batch, height, width, generator=generator) * num[:, None, None]).long()
    return labels, num


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_pool_and_broadcast_equal_reference(dtype, shape):
    batch, channels, height, width = shape
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
    labels, num = random_regions(batch, height, width)
    pooled = mgccl_ops.region_pool(x, labels, num)
    ref_pooled = reference.region_pool(x, labels, num)
    assert pooled.dtype == dtype and pooled.shape == (batch, int(num.max()), channels)
    assert_close(pooled, ref_pooled, dtype, "pooled")
    out = mgccl_ops.region_broadcast(pooled, labels)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out, reference.region_broadcast(ref_pooled, labels), dtype, "broadcast")
    upstream = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(dtype)
    (grad,) = torch.autograd.grad(out, x, upstream)
    (ref_grad,) = torch.autograd.grad(reference.region_broadcast(ref_pooled, labels), x, upstream)
    assert grad.dtype == dtype
    assert_close(grad, ref_grad, dtype, "grad x")


def test_absent_regions_are_zero():
    x = torch.randn(2, 3, 4, 5)
    labels = torch.zeros(2, 4, 5, dtype=torch.int64)
    labels[0, 2:] = 3  # image 0 uses regions 0 and 3 of num = 5; image 1 only region 0 of num = 1
    pooled = mgccl_ops.region_pool(x, labels, torch.tensor([5, 1]))
    assert pooled.shape == (2, 5, 3)
    assert not pooled[0, [1, 2, 4]].any() and not pooled[1, 1:].any()
    torch.testing.assert_close(pooled[0, 3], x[0, :, 2:].mean((1, 2)))


def test_non_contiguous_inputs():
    x = torch.randn(2, 6, 9, 8).to(memory_format=torch.channels_last)
    labels, num = random_regions(2, 9, 8, seed=2)
    pooled = mgccl_ops.region_pool(x, labels.transpose(1, 2).contiguous().transpose(1, 2), num)
    torch.testing.assert_close(pooled, reference.region_pool(x, labels, num))
    pooled_t = pooled.transpose(0, 1).contiguous().transpose(0, 1)
    torch.testing.assert_close(mgccl_ops.region_broadcast(pooled_t, labels), reference.region_broadcast(pooled, labels))


def test_gradcheck():
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    labels, num = random_regions(2, 5, 4, seed=3)
    pooled = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: mgccl_ops.region_pool(x, labels, num), (x,))
    torch.autograd.gradgradcheck(lambda x: mgccl_ops.region_pool(x, labels, num), (x,))
    torch.autograd.gradcheck(lambda p: mgccl_ops.region_broadcast(p, labels), (pooled,))
    torch.autograd.gradgradcheck(lambda p: mgccl_ops.region_broadcast(p, labels), (pooled,))


@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 4),
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_property_pool_then_broadcast_keeps_piecewise_constant_maps(batch, channels, height, width, seed):
    labels, num = random_regions(batch, height, width, seed=seed)
    values = torch.randn(batch, int(num.max()), channels, generator=torch.Generator().manual_seed(seed))
    piecewise = reference.region_broadcast(values, labels)  # constant on every region
    again = mgccl_ops.region_broadcast(mgccl_ops.region_pool(piecewise, labels, num), labels)
    torch.testing.assert_close(again, piecewise)


def test_torch_compile_fullgraph():
    """region_pool's R = num.max() is an unbacked symbolic size under torch.compile: no graph break."""

    def pool_twice(x, labels, num):
        return mgccl_ops.region_broadcast(2 * mgccl_ops.region_pool(x, labels, num), labels)

    x = torch.randn(2, 3, 6, 5, requires_grad=True)
    labels, num = random_regions(2, 6, 5, seed=4)
    compiled = torch.compile(pool_twice, fullgraph=True, backend="aot_eager")
    out = compiled(x, labels, num)
    torch.testing.assert_close(out, pool_twice(x, labels, num))
    (grad,) = torch.autograd.grad(out.sum(), x)
    (expected,) = torch.autograd.grad(pool_twice(x, labels, num).sum(), x)
    torch.testing.assert_close(grad, expected)


def opcheck_samples():
    labels, num = random_regions(2, 5, 4, seed=5)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(2, 3, 5, 4, dtype=dtype, requires_grad=True)
        pooled = torch.randn(2, int(num.max()), 3, dtype=dtype, requires_grad=True)
        yield "region_pool", (x, labels, num)
        yield "region_broadcast", (pooled, labels)
        yield "region_sum", (x, labels, int(num.max()) + 2)


@pytest.mark.parametrize(("op", "sample"), list(opcheck_samples()))
def test_opcheck(op, sample):
    torch.library.opcheck(getattr(torch.ops.mgccl, op).default, sample)


def bad_pool_inputs():
    x = torch.randn(2, 3, 4, 5)
    labels = torch.zeros(2, 4, 5, dtype=torch.int64)
    num = torch.tensor([2, 1])
    out_of_range = labels.clone()
    out_of_range[1, 3, 4] = 1
    negative = labels.clone()
    negative[0, 0, 0] = -1
    return [
        ((x, out_of_range, num), RuntimeError, r"labels of image 1 should lie in \[0, 1\).*max 1"),
        ((x, negative, num), RuntimeError, r"labels of image 0 should lie in \[0, 2\).*min -1"),
        ((x, labels, torch.tensor([2, -1])), RuntimeError, r"num values should lie in \[0,.*min -1"),
        ((x[0], labels, num), ValueError, r"x should be a 4-D tensor .* got 3-D"),
        ((x, labels[0], num), ValueError, r"labels should be a 3-D tensor .* got 2-D"),
        ((x, labels.int(), num), ValueError, r"labels should be int64, got torch.int32"),
        ((x, labels[:, :3], num), ValueError, r"labels should have shape \[B, H, W\] = \[2, 4, 5\]"),
        ((x, labels, num[:1]), ValueError, r"num.shape\[0\] should equal B = 2"),
        ((x.long(), labels, num), ValueError, r"x should be float16.*got torch.int64"),
    ]


@pytest.mark.parametrize(("args", "error", "match"), bad_pool_inputs())
def test_pool_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        mgccl_ops.region_pool(*args)


def test_broadcast_and_sum_bad_input():
    pooled = torch.randn(2, 3, 4)
    labels = torch.zeros(2, 5, 6, dtype=torch.int64)
    labels[1, 4, 5] = 3
    with pytest.raises(RuntimeError, match=r"labels values should lie in \[0, 3\), got min 0 and max 3"):
        mgccl_ops.region_broadcast(pooled, labels)
    with pytest.raises(ValueError, match=r"pooled should be a 3-D tensor \[B, R, C\], got 2-D"):
        mgccl_ops.region_broadcast(pooled[0], labels)
    with pytest.raises(ValueError, match=r"labels.shape\[0\] should equal B = 2"):
        mgccl_ops.region_broadcast(pooled, labels[:1])
    with pytest.raises(RuntimeError, match=r"region_sum: labels values should lie in \[0, 2\)"):
        torch.ops.mgccl.region_sum(torch.randn(2, 4, 5, 6), labels, 2)
    with pytest.raises(RuntimeError, match=r"region_pool: labels should have shape"):
        torch.ops.mgccl.region_pool(torch.randn(2, 4, 5, 7), labels, torch.tensor([4, 4]))
