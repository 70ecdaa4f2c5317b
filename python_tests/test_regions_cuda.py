"""The CUDA kernels of the region ops against the CPU kernels (and through them the references).

Every test needs a GPU (``conftest.py`` skips the ``gpu`` marker where there is none). Labels
and counts are canonical, and both devices run the same per-element code (csrc/common/) with
pinned rounding, so region_merge and region_auto_threshold must agree bitwise; the pooled sums
use the CPU's summation order, so they agree bitwise too, and are identical run to run.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mgccl_ops
from mgccl_ops.bench.synthetic_regions import piecewise_constant_images

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (batch, channels, size): batch 1..64, 64^2..512^2, C = 3..768, within a few seconds each.
SHAPES = [(1, 3, 64), (4, 64, 128), (2, 768, 64), (64, 16, 64), (3, 32, 512), (1, 3, 512)]


def images(batch, channels, size, *, dtype=torch.float32, seed=0, noise=0.5):
    feat, _ = piecewise_constant_images(
        batch, channels, size, size, segments=24, noise=noise, correlation=0.5, seed=seed
    )
    return feat.to(dtype)


def merge_both(feat, threshold, **kwargs):
    cpu = mgccl_ops.region_merge(feat, threshold, **kwargs)
    thr = threshold.cuda() if isinstance(threshold, torch.Tensor) else threshold
    cuda = mgccl_ops.region_merge(feat.cuda(), thr, **kwargs)
    return cpu, cuda


def assert_same_labels(cpu, cuda):
    labels, num = cuda
    assert labels.is_cuda and num.is_cuda and labels.dtype == torch.int64
    assert torch.equal(labels.cpu(), cpu[0]), "labels differ from the CPU kernel's"
    assert torch.equal(num.cpu(), cpu[1]), "counts differ from the CPU kernel's"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("linkage", ["single", "average"])
@pytest.mark.parametrize("connectivity", [4, 8])
def test_merge_equals_cpu(shape, linkage, connectivity):
    feat = images(*shape)
    cpu, cuda = merge_both(feat, "auto", linkage=linkage, connectivity=connectivity)
    assert_same_labels(cpu, cuda)
    assert int(cpu[1].min()) >= 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("linkage", ["single", "average"])
def test_merge_equals_cpu_in_every_dtype(dtype, linkage):
    feat = images(3, 24, 96, dtype=dtype, seed=3)
    for threshold in ("auto", torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)):
        cpu, cuda = merge_both(feat, threshold, linkage=linkage)
        assert_same_labels(cpu, cuda)


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_auto_threshold_equals_cpu(connectivity, dtype):
    feat = images(5, 16, 80, dtype=dtype, seed=5)
    cpu = mgccl_ops.region_auto_threshold(feat, connectivity=connectivity)
    cuda = mgccl_ops.region_auto_threshold(feat.cuda(), connectivity=connectivity)
    assert cuda.is_cuda and cuda.dtype == torch.float64
    assert torch.equal(cuda.cpu(), cpu)


def test_threshold_extremes_and_tiny_images():
    feat = images(2, 8, 64, seed=7)
    for threshold in (-1.0, 1.5):
        for linkage in ("single", "average"):
            cpu, cuda = merge_both(feat, threshold, linkage=linkage)
            assert_same_labels(cpu, cuda)
    for shape in [(2, 3, 1, 1), (1, 3, 1, 9), (2, 3, 9, 1), (0, 3, 4, 4), (2, 3, 0, 4)]:
        feat = torch.randn(shape)
        for linkage in ("single", "average"):
            assert_same_labels(*merge_both(feat, "auto", linkage=linkage))
        cpu = mgccl_ops.region_auto_threshold(feat)
        assert torch.equal(mgccl_ops.region_auto_threshold(feat.cuda()).cpu(), cpu)


@pytest.mark.parametrize("linkage", ["single", "average"])
def test_non_finite_features_equal_cpu(linkage):
    """NaN / inf pixels give NaN similarities: never picked or merged, left out of "auto"."""
    feat = images(3, 8, 48, seed=11)
    feat[0, :, 5, 7] = float("nan")
    feat[1, 2, 10:12, 3:30] = float("inf")
    feat[2] = float("nan")  # every edge NaN: threshold +inf
    cpu = mgccl_ops.region_auto_threshold(feat)
    assert torch.equal(mgccl_ops.region_auto_threshold(feat.cuda()).cpu(), cpu)
    assert cpu[2] == float("inf")
    assert_same_labels(*merge_both(feat, "auto", linkage=linkage))


@settings(deadline=None, max_examples=25)
@given(
    st.integers(1, 6),
    st.integers(1, 9),
    st.integers(1, 24),
    st.integers(1, 24),
    st.sampled_from([4, 8]),
    st.sampled_from(["single", "average"]),
    st.integers(0, 2**16),
    st.sampled_from([0, 2, 3]),
)
def test_property_merge_with_ties_equals_cpu(batch, channels, height, width, connectivity, linkage, seed, levels):
    generator = torch.Generator().manual_seed(seed)
    if levels:  # few distinct values: many exactly tied similarities and picks
        feat = torch.randint(0, levels, (batch, channels, height, width), generator=generator).float()
    else:
        feat = torch.randn(batch, channels, height, width, generator=generator)
    threshold = torch.rand(batch, generator=generator, dtype=torch.float64) * 2 - 1
    cpu, cuda = merge_both(feat, threshold, linkage=linkage, connectivity=connectivity)
    assert_same_labels(cpu, cuda)


@pytest.mark.parametrize("shape", [(1, 3, 64), (8, 64, 128), (2, 768, 64), (64, 8, 64), (2, 16, 512)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_sum_broadcast_equal_cpu(shape, dtype):
    batch, channels, size = shape
    feat = images(batch, channels, size, seed=2)
    labels, num = mgccl_ops.region_merge(feat, "auto")
    x = torch.randn(feat.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    x_cpu = x.clone().requires_grad_(True)
    x_cuda = x.cuda().requires_grad_(True)
    pooled_cpu, _ = torch.ops.mgccl.region_pool(x_cpu.detach(), labels, num)
    pooled_cuda, counts_cuda = torch.ops.mgccl.region_pool(x_cuda.detach(), labels.cuda(), num.cuda())
    assert torch.equal(pooled_cuda.cpu(), pooled_cpu)
    assert torch.equal(counts_cuda.cpu(), torch.ops.mgccl.region_pool(x_cpu.detach(), labels, num)[1])
    again, _ = torch.ops.mgccl.region_pool(x_cuda.detach(), labels.cuda(), num.cuda())
    assert torch.equal(again, pooled_cuda), "region_pool is not deterministic"
    regions = int(num.max())
    assert torch.equal(
        torch.ops.mgccl.region_sum(x_cuda.detach(), labels.cuda(), regions).cpu(),
        torch.ops.mgccl.region_sum(x_cpu.detach(), labels, regions),
    )
    # Gradients of the pooled means through the public wrappers (region_sum / region_broadcast).
    upstream = torch.randn(batch, regions, channels, generator=torch.Generator().manual_seed(4)).to(dtype)
    out_cpu = mgccl_ops.region_pool(x_cpu, labels, num)  # the pooled means [B, R, C]
    out_cuda = mgccl_ops.region_pool(x_cuda, labels.cuda(), num.cuda())
    assert torch.equal(out_cuda.detach().cpu(), out_cpu.detach())
    (grad_cpu,) = torch.autograd.grad(out_cpu, x_cpu, upstream)
    (grad_cuda,) = torch.autograd.grad(out_cuda, x_cuda, upstream.cuda())
    torch.testing.assert_close(grad_cuda.cpu(), grad_cpu)  # elementwise backward: ATen's ops per device
    broadcast_cuda = mgccl_ops.region_broadcast(out_cuda.detach(), labels.cuda())
    assert torch.equal(broadcast_cuda.cpu(), mgccl_ops.region_broadcast(out_cpu.detach(), labels))


def test_pool_empty_and_absent_regions():
    x = torch.randn(2, 3, 4, 5)
    labels = torch.zeros(2, 4, 5, dtype=torch.int64)
    labels[0, 2:] = 3
    num = torch.tensor([5, 1])
    cpu = torch.ops.mgccl.region_pool(x, labels, num)
    cuda = torch.ops.mgccl.region_pool(x.cuda(), labels.cuda(), num.cuda())
    assert torch.equal(cuda[0].cpu(), cpu[0]) and torch.equal(cuda[1].cpu(), cpu[1])
    empty = torch.ops.mgccl.region_pool(torch.randn(0, 3, 4, 5).cuda(), labels[:0].cuda(), num[:0].cuda())
    assert empty[0].shape == (0, 0, 3)


@pytest.mark.parametrize("linkage", ["single", "average"])
def test_opcheck_cuda(linkage):
    feat = images(2, 8, 32).cuda()
    torch.library.opcheck(torch.ops.mgccl.region_merge.default, (feat, None, 4, linkage))
    labels, num = mgccl_ops.region_merge(feat, "auto", linkage=linkage)
    x = torch.randn(2, 5, 32, 32, device="cuda")
    torch.library.opcheck(torch.ops.mgccl.region_pool.default, (x, labels, num))
    torch.library.opcheck(torch.ops.mgccl.region_sum.default, (x, labels, int(num.max())))
    pooled = torch.randn(2, int(num.max()), 5, device="cuda")
    torch.library.opcheck(torch.ops.mgccl.region_broadcast.default, (pooled, labels))
