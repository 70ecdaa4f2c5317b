"""Every op on CUDA: against the CPU kernel and the plain-PyTorch reference (float32, bfloat16,
float16), under CUDA autocast, through ``torch.compile(fullgraph=True)``, peak-memory bounds, a
training step captured in a CUDA graph, and both GPU providers of ``contrastive_loss``.

Every test needs a GPU (``pytest -m gpu``; ``conftest.py`` skips them elsewhere); bench/gpu_check.sh
runs them. Inputs are built on the CPU and copied, so CPU and CUDA see the same values.

Exact inputs: the similarity-family tests mostly use "grid" rows, entries k / 8 with |k| <= 4.
Every product and partial sum of two such rows is a multiple of 1/64 far below 2^24, so a dot
product is exact in float32 whatever the summation order and whatever the input dtype (float16
and bfloat16 hold the entries exactly). Mining is then exact on every device and ties are
real ties, so the CUDA kernels must return the CPU kernel's indices exactly, tie rule included;
the losses differ only by the rounding of exp/log and of the gradients to the input dtype.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from compare import assert_close

import mgccl_ops
from mgccl_ops import reference
from mgccl_ops.bench.synthetic_regions import piecewise_constant_images
from mgccl_ops.ops import devices

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CUDA = "cuda"


def grid_rows(n: int, d: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[n, d] on the CPU with entries in {-4/8, ..., 4/8}: dot products are exact (see module doc)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(-4, 5, (n, d), generator=generator).to(torch.float64) / 8).to(dtype)


def unit_rows(n: int, d: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=1).to(dtype)


def leaf(t: torch.Tensor, device: str) -> torch.Tensor:
    return t.detach().to(device).requires_grad_()


def grads_of(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor's gradient (zeros where none reached it)."""
    return [t.grad if t.grad is not None else torch.zeros_like(t) for t in tensors]


def assert_all_close(actual: list[torch.Tensor], expected: list[torch.Tensor], dtype: torch.dtype, names) -> None:
    for name, a, e in zip(names, actual, expected):
        assert_close(a, e, dtype, name)


# -------------------------------------------------------------------- contrastive_loss


def contrastive_run(device, q, k, pos, scale, weight, reduction, symmetric, upstream, fn=None):
    """Loss and (q, k, scale) gradients of ``fn`` (default the op) on ``device``."""
    fn = fn or mgccl_ops.contrastive_loss
    q, k, scale = leaf(q, device), leaf(k, device), leaf(scale, device)
    weight = None if weight is None else weight.to(device)
    loss = fn(q, k, pos.to(device), scale, weight=weight, reduction=reduction, symmetric=symmetric)
    loss.backward(upstream.to(device=device, dtype=loss.dtype).expand_as(loss))
    return [loss.detach(), *grads_of(q, k, scale)]


CONTRASTIVE_CASES = [  # n, m, d, symmetric, weighted
    (37, 53, 24, False, True),
    (64, 64, 67, True, False),
    (300, 700, 129, False, True),
    (0, 9, 16, False, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(("n", "m", "d", "symmetric", "weighted"), CONTRASTIVE_CASES)
def test_contrastive_loss_matches_cpu_kernel_and_reference(dtype, reduction, n, m, d, symmetric, weighted):
    q, k = unit_rows(n, d, 1, dtype), unit_rows(m, d, 2, dtype)
    generator = torch.Generator().manual_seed(3)
    if symmetric:
        pos = torch.randperm(n, generator=generator)
    else:
        pos = torch.randint(0, max(m, 1), (n,), generator=generator) if m else torch.full((n,), -1)
        pos[torch.rand(n, generator=generator) < 0.2] = -1
    weight = (torch.rand(n, generator=generator) + 0.5).to(dtype) if weighted else None
    scale = torch.tensor(12.5)
    upstream = torch.randn(n, generator=generator) if reduction == "none" else torch.tensor(0.75)
    args = (q, k, pos, scale, weight, reduction, symmetric, upstream)
    on_gpu = contrastive_run(CUDA, *args)
    on_cpu = contrastive_run("cpu", *args)
    names = ("loss", "grad_q", "grad_k", "grad_scale")
    for name, a, c in zip(names, on_gpu, on_cpu):
        assert a.device.type == CUDA and a.dtype == c.dtype, (name, a.device, a.dtype, c.dtype)
    assert_all_close(on_gpu, on_cpu, dtype, names)
    expected = contrastive_run(
        "cpu", q.double(), k.double(), pos, scale.double(), weight, reduction, symmetric, upstream.double(),
        fn=reference.contrastive_loss,
    )  # fmt: skip
    assert_all_close(on_gpu, expected, dtype, names)


# -------------------------------------------------------------------- topk_hard_negatives


def mining_options() -> set[str]:
    return set(inspect.signature(mgccl_ops.topk_hard_negatives).parameters)


def mine(device: str, q, k, num, **options):
    moved = {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in options.items()}
    idx, sim = mgccl_ops.topk_hard_negatives(q.to(device), k.to(device), num, **moved)
    return idx.cpu(), sim.cpu()


MINING_CASES = [  # n, m, d, num
    (37, 53, 24, 5),
    (130, 700, 37, 300),  # num larger than a tile
    (64, 64, 67, 64),  # num = M: every row padded where keys are excluded
    (19, 2000, 9, 1500),  # beyond the fused path's num
    (0, 10, 8, 3),
    (6, 10, 8, 0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "m", "d", "num"), MINING_CASES)
def test_topk_hard_negatives_equals_cpu_kernel_and_reference_exactly(dtype, n, m, d, num):
    q, k = grid_rows(n, d, 4, dtype), grid_rows(m, d, 5, dtype)
    generator = torch.Generator().manual_seed(6)
    pos = torch.randint(-1, m, (n,), generator=generator)
    q_group, k_group = torch.randint(0, 7, (n,), generator=generator), torch.randint(0, 7, (m,), generator=generator)
    for options in ({}, {"pos": pos}, {"pos": pos, "q_group": q_group, "k_group": k_group}):
        idx, sim = mine(CUDA, q, k, num, **options)
        idx_cpu, sim_cpu = mine("cpu", q, k, num, **options)
        assert idx.dtype == torch.int64 and sim.dtype == torch.float32
        assert torch.equal(idx, idx_cpu), f"{options.keys()}: indices differ from the CPU kernel's"
        assert torch.equal(sim, sim_cpu), f"{options.keys()}: similarities differ from the CPU kernel's"
        idx_ref, sim_ref = reference.topk_hard_negatives(q, k, num, **options)
        assert torch.equal(idx, idx_ref) and torch.equal(sim, sim_ref)


def test_topk_hard_negatives_never_selects_nan_and_pads_rows_with_every_key_excluded():
    q, k = grid_rows(8, 16, 7), grid_rows(40, 16, 8)
    k[3, 0] = float("nan")
    k_group = torch.zeros(40, dtype=torch.int64)
    q_group = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])  # rows of group 0 have no allowed key
    idx, sim = mine(CUDA, q, k, 12, q_group=q_group, k_group=k_group)
    idx_cpu, sim_cpu = mine("cpu", q, k, 12, q_group=q_group, k_group=k_group)
    assert torch.equal(idx, idx_cpu) and torch.equal(sim, sim_cpu)
    assert (idx[q_group == 0] == -1).all() and torch.isneginf(sim[q_group == 0]).all()
    assert not (idx == 3).any()


@pytest.mark.skipif("skip" not in mining_options(), reason="mining options not in this version")
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_hard_negatives_mining_options_equal_cpu_kernel(dtype):
    n = 45
    q, k = grid_rows(n, 20, 9, dtype), grid_rows(n, 20, 10, dtype)
    pos = torch.randint(-1, n, (n,), generator=torch.Generator().manual_seed(11))
    for options in (
        {"exclude_self": True},
        {"max_sim": 0.5},
        {"pos": pos, "margin": 0.25},
        {"pos": pos, "skip": 3},
        {"pos": pos, "exclude_self": True, "max_sim": 1.0, "margin": 0.0, "skip": 1},
    ):
        idx, sim = mine(CUDA, q, k, 7, **options)
        idx_cpu, sim_cpu = mine("cpu", q, k, 7, **options)
        assert torch.equal(idx, idx_cpu) and torch.equal(sim, sim_cpu), options


# -------------------------------------------------------------------- hard_negative_loss


def hard_negative_run(device, q, k, pos, neg_idx, scale, weight, reduction, upstream, fn=None):
    fn = fn or mgccl_ops.hard_negative_loss
    q, k, scale = leaf(q, device), leaf(k, device), leaf(scale, device)
    weight = None if weight is None else weight.to(device)
    loss = fn(q, k, pos.to(device), neg_idx.to(device), scale, weight=weight, reduction=reduction)
    loss.backward(upstream.to(device=device, dtype=loss.dtype).expand_as(loss))
    return [loss.detach(), *grads_of(q, k, scale)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("n", "m", "d", "num"), [(37, 53, 24, 8), (300, 700, 129, 64), (0, 5, 4, 2)])
def test_hard_negative_loss_matches_cpu_kernel_and_reference(dtype, reduction, n, m, d, num):
    q, k = unit_rows(n, d, 12, dtype), unit_rows(m, d, 13, dtype)
    generator = torch.Generator().manual_seed(14)
    pos = torch.randint(-1, m, (n,), generator=generator)
    neg_idx = torch.randint(-1, m, (n, num), generator=generator)  # padding and duplicates included
    weight = (torch.rand(n, generator=generator) + 0.5).to(dtype)
    scale = torch.tensor(9.0)
    upstream = torch.randn(n, generator=generator) if reduction == "none" else torch.tensor(1.25)
    args = (q, k, pos, neg_idx, scale, weight, reduction, upstream)
    names = ("loss", "grad_q", "grad_k", "grad_scale")
    on_gpu = hard_negative_run(CUDA, *args)
    assert_all_close(on_gpu, hard_negative_run("cpu", *args), dtype, names)
    expected = hard_negative_run(
        "cpu", q.double(), k.double(), pos, neg_idx, scale.double(), weight, reduction, upstream.double(),
        fn=reference.hard_negative_loss,
    )  # fmt: skip
    assert_all_close(on_gpu, expected, dtype, names)


# -------------------------------------------------------------------- multi_grained_loss


def multi_grained_run(device, level_qs, level_pos, level_groups, k, k_group, scale, hard_negatives, fn=None):
    fn = fn or mgccl_ops.multi_grained_loss
    qs = [leaf(q, device) for q in level_qs]
    k_leaf, scale_leaf = leaf(k, device), leaf(scale, device)
    levels = [
        (q, pos.to(device), weight, group.to(device))
        for q, pos, weight, group in zip(qs, level_pos, (1.0, 0.5, 0.25), level_groups)
    ]
    total, per_level = fn(levels, k_leaf, scale_leaf, k_group=k_group.to(device), hard_negatives=hard_negatives)
    total.backward()
    return [total.detach(), per_level.detach(), *grads_of(*qs, k_leaf, scale_leaf)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hard_negatives", [None, 8, 100])
def test_multi_grained_loss_matches_cpu_kernel_and_reference(dtype, hard_negatives):
    m, d = 90, 40
    sizes = (12, 48, 600)
    generator = torch.Generator().manual_seed(15)
    k = grid_rows(m, d, 16, dtype)
    k_group = torch.randint(0, 30, (m,), generator=generator)
    level_qs = [grid_rows(n, d, 17 + i, dtype) for i, n in enumerate(sizes)]
    level_pos = [torch.randint(-1, m, (n,), generator=generator) for n in sizes]
    level_groups = [torch.where(pos >= 0, k_group[pos.clamp_min(0)], -1) for pos in level_pos]
    args = (level_qs, level_pos, level_groups, k, k_group, torch.tensor(3.0), hard_negatives)
    names = ("total", "per_level", "grad_q0", "grad_q1", "grad_q2", "grad_k", "grad_scale")
    on_gpu = multi_grained_run(CUDA, *args)
    assert_all_close(on_gpu, multi_grained_run("cpu", *args), dtype, names)
    expected = multi_grained_run(
        "cpu", [q.double() for q in level_qs], level_pos, level_groups, k.double(), k_group,
        torch.tensor(3.0, dtype=torch.float64), hard_negatives, fn=reference.multi_grained_loss,
    )  # fmt: skip
    assert_all_close(on_gpu, expected, dtype, names)


# -------------------------------------------------------------------- region ops


def region_features(batch, channels, height, width, dtype, seed):
    """Noisy piecewise-constant features whose neighbour cosines are near 1 inside a cell and at
    most about 0.85 across cells, so a threshold of 0.92 is far from every edge on every device."""
    feat, _ = piecewise_constant_images(
        batch, channels, height, width, segments=12, noise=0.1, correlation=0.5, seed=seed
    )
    return feat.to(dtype)


REGION_SHAPES = [(1, 3, 64, 64), (4, 32, 37, 53), (2, 768, 96, 80)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("linkage", ["single", "average"])
@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize(("batch", "channels", "height", "width"), REGION_SHAPES)
def test_region_merge_labels_equal_cpu_kernel(dtype, linkage, connectivity, batch, channels, height, width):
    feat = region_features(batch, channels, height, width, dtype, seed=batch + channels)
    labels, num = mgccl_ops.region_merge(feat.to(CUDA), 0.92, connectivity=connectivity, linkage=linkage)
    labels_cpu, num_cpu = mgccl_ops.region_merge(feat, 0.92, connectivity=connectivity, linkage=linkage)
    assert labels.device.type == CUDA
    assert torch.equal(num.cpu(), num_cpu) and torch.equal(labels.cpu(), labels_cpu)
    if dtype == torch.float32 and channels <= 32:
        labels_ref, num_ref = reference.region_merge(feat, 0.92, connectivity=connectivity, linkage=linkage)
        assert torch.equal(labels_cpu, labels_ref) and torch.equal(num_cpu, num_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("connectivity", [4, 8])
def test_region_auto_threshold_matches_cpu_kernel(dtype, connectivity):
    feat = region_features(3, 16, 40, 50, dtype, seed=20)
    on_gpu = mgccl_ops.region_auto_threshold(feat.to(CUDA), connectivity=connectivity)
    on_cpu = mgccl_ops.region_auto_threshold(feat, connectivity=connectivity)
    assert on_gpu.dtype == torch.float64
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_region_pool_broadcast_and_gradients_match_cpu_kernel_and_reference(dtype):
    feat = region_features(3, 8, 33, 47, torch.float32, seed=21)
    labels, num = mgccl_ops.region_merge(feat, 0.92)
    x = torch.randn(3, 24, 33, 47, generator=torch.Generator().manual_seed(22)).to(dtype)
    upstream = torch.randn(3, 24, 33, 47, generator=torch.Generator().manual_seed(23)).to(dtype)
    results = {}
    for device in ("cpu", CUDA):
        x_leaf = leaf(x, device)
        pooled = mgccl_ops.region_pool(x_leaf, labels.to(device), num.to(device))
        back = mgccl_ops.region_broadcast(pooled * 2, labels.to(device))
        back.backward(upstream.to(device))
        results[device] = [pooled.detach(), back.detach(), x_leaf.grad]
    names = ("pooled", "broadcast", "grad_x")
    assert_all_close(results[CUDA], results["cpu"], dtype, names)
    expected_pooled = reference.region_pool(x.double(), labels, num)
    assert_close(results[CUDA][0], expected_pooled, dtype, "pooled against the reference")
    assert_close(
        results[CUDA][1], reference.region_broadcast(2 * expected_pooled, labels), dtype, "broadcast vs reference"
    )
    summed = torch.ops.mgccl.region_sum.default(x.to(CUDA), labels.to(CUDA), int(num.max()) + 1)
    assert_close(summed, torch.ops.mgccl.region_sum.default(x, labels, int(num.max()) + 1), dtype, "region_sum")


@pytest.mark.parametrize("dtype", DTYPES)
def test_adaptive_semantic_unit_matches_cpu(dtype):
    feat = region_features(2, 16, 30, 34, dtype, seed=24)
    text = unit_rows(6, 16, 25, dtype)
    on_gpu = mgccl_ops.adaptive_semantic_unit(feat.to(CUDA), text.to(CUDA), threshold=0.92)
    on_cpu = mgccl_ops.adaptive_semantic_unit(feat, text, threshold=0.92)
    assert on_gpu.dtype == dtype
    assert_close(on_gpu, on_cpu, dtype, "logits")


# -------------------------------------------------------------------- opcheck on CUDA


def opcheck_samples():
    q, k = grid_rows(10, 12, 26).to(CUDA), grid_rows(14, 12, 27).to(CUDA)
    pos = torch.tensor([0, 3, -1, 5, 2, 13, 7, 7, 1, 0], device=CUDA)
    scale = torch.tensor(2.0, device=CUDA)
    neg_idx, _ = mgccl_ops.topk_hard_negatives(q, k, 4, pos=pos)
    feat = region_features(2, 6, 9, 11, torch.float32, seed=28).to(CUDA)
    labels, num = mgccl_ops.region_merge(feat, 0.92)
    x = torch.randn(2, 5, 9, 11, device=CUDA, requires_grad=True)
    grad_mask = [True, True, True]
    return {
        "contrastive_loss": (q.requires_grad_(), k.requires_grad_(), pos, scale, None, "mean", False, grad_mask),
        "hard_negative_loss": (q, k, pos, neg_idx, scale, None, "sum", grad_mask),
        "region_merge": (feat, torch.full((2,), 0.92, dtype=torch.float64, device=CUDA), 4, "average"),
        "region_auto_threshold": (feat, 8),
        "region_pool": (x, labels, num),
        "region_broadcast": (torch.randn(2, int(num.max()), 5, device=CUDA, requires_grad=True), labels),
        "region_sum": (x, labels, int(num.max()) + 1),
    }


@pytest.mark.parametrize(
    "name",
    [
        "contrastive_loss",
        "hard_negative_loss",
        "region_merge",
        "region_auto_threshold",
        "region_pool",
        "region_broadcast",
        "region_sum",
    ],
)
def test_opcheck_on_cuda(name):
    torch.library.opcheck(getattr(torch.ops.mgccl, name).default, opcheck_samples()[name])


def test_opcheck_topk_hard_negatives_on_cuda():
    op = torch.ops.mgccl.topk_hard_negatives.default
    q, k = grid_rows(10, 12, 29).to(CUDA), grid_rows(14, 12, 30).to(CUDA)
    pos = torch.tensor([0, 3, -1, 5, 2, 13, 7, 7, 1, 0], device=CUDA)
    names = [argument.name for argument in op._schema.arguments]
    defaults = {"q_group": None, "k_group": None, "exclude_self": False, "max_sim": None, "margin": None, "skip": 0}
    values = {"q": q, "k": k, "num": 5, "pos": pos, **defaults}
    torch.library.opcheck(op, tuple(values[name] for name in names))


# -------------------------------------------------------------------- autocast on CUDA


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_similarity_ops_under_cuda_autocast_equal_the_ops_on_cast_inputs(amp):
    q32, k32 = unit_rows(200, 64, 31).to(CUDA), unit_rows(200, 64, 32).to(CUDA)
    pos = torch.arange(200, device=CUDA)
    q, k = leaf(q32, CUDA), leaf(k32, CUDA)
    with torch.autocast(CUDA, dtype=amp):
        loss = mgccl_ops.contrastive_loss(q, k, pos, 10.0, symmetric=True)
        idx, sim = mgccl_ops.topk_hard_negatives(q, k, 8, pos=pos)
        hard = mgccl_ops.hard_negative_loss(q, k, pos, idx, 10.0)
    assert loss.dtype == hard.dtype == sim.dtype == torch.float32
    (loss + hard).backward()
    assert q.grad.dtype == k.grad.dtype == torch.float32
    q_low, k_low = leaf(q32.to(amp), CUDA), leaf(k32.to(amp), CUDA)
    expected = mgccl_ops.contrastive_loss(q_low, k_low, pos, 10.0, symmetric=True)
    idx_low, sim_low = mgccl_ops.topk_hard_negatives(q_low, k_low, 8, pos=pos)
    expected_hard = mgccl_ops.hard_negative_loss(q_low, k_low, pos, idx_low, 10.0)
    (expected + expected_hard).backward()
    assert torch.equal(idx, idx_low)
    assert_close(sim, sim_low, torch.float32, "sim")
    assert_close(loss, expected, torch.float32, "loss")
    assert_close(hard, expected_hard, torch.float32, "hard-negative loss")
    assert_close(q.grad, q_low.grad.float(), amp, "grad_q")
    assert_close(k.grad, k_low.grad.float(), amp, "grad_k")


def test_region_ops_keep_their_dtype_under_cuda_autocast():
    feat = region_features(2, 8, 20, 24, torch.float32, seed=33).to(CUDA)
    with torch.autocast(CUDA, dtype=torch.bfloat16):
        labels, num = mgccl_ops.region_merge(feat, 0.92)
        pooled = mgccl_ops.region_pool(feat, labels, num)
    assert pooled.dtype == torch.float32
    expected_labels, expected_num = mgccl_ops.region_merge(feat, 0.92)
    assert torch.equal(labels, expected_labels) and torch.equal(num, expected_num)
    assert_close(pooled, mgccl_ops.region_pool(feat, expected_labels, expected_num), torch.float32, "pooled")


# -------------------------------------------------------------------- torch.compile


def test_torch_compile_fullgraph_through_the_similarity_ops():
    q32, k32 = unit_rows(256, 64, 34).to(CUDA), unit_rows(320, 64, 35).to(CUDA)
    pos = torch.randint(0, 320, (256,), generator=torch.Generator().manual_seed(36)).to(CUDA)
    k_group = torch.arange(320, device=CUDA) % 40
    q_group = k_group[pos]

    def step(q, k, logit_scale):
        scale = logit_scale.exp()
        square = mgccl_ops.contrastive_loss(q, k[:256], torch.arange(256, device=CUDA), scale, symmetric=True)
        full = mgccl_ops.contrastive_loss(q, k, pos, scale, reduction="none").mean()
        idx, _ = mgccl_ops.topk_hard_negatives(q, k, 16, pos=pos, q_group=q_group, k_group=k_group)
        hard = mgccl_ops.hard_negative_loss(q, k, pos, idx, scale)
        total, _ = mgccl_ops.multi_grained_loss(
            [(q[:64], pos[:64], 1.0, q_group[:64]), (q[64:], pos[64:], 0.5, q_group[64:])],
            k, scale, k_group=k_group, hard_negatives=8,
        )  # fmt: skip
        return square + full + hard + total

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (compiled, step):
        q, k, logit_scale = leaf(q32, CUDA), leaf(k32, CUDA), leaf(torch.tensor(2.3), CUDA)
        loss = fn(q, k, logit_scale)
        loss.backward()
        results.append([loss.detach(), q.grad, k.grad, logit_scale.grad])
    assert_all_close(results[0], results[1], torch.float32, ("loss", "grad_q", "grad_k", "grad_scale"))


def test_torch_compile_fullgraph_through_the_region_ops():
    feat = region_features(2, 16, 28, 30, torch.float32, seed=37).to(CUDA)
    text = unit_rows(5, 16, 38).to(CUDA)

    def segment(feat, text):
        labels, num = mgccl_ops.region_merge(feat, "auto")
        thresholds = mgccl_ops.region_auto_threshold(feat)
        pooled = mgccl_ops.region_broadcast(mgccl_ops.region_pool(feat, labels, num), labels)
        logits = mgccl_ops.adaptive_semantic_unit(feat, text, threshold=0.92)
        return labels, num, thresholds, pooled, logits

    compiled = torch.compile(segment, fullgraph=True)
    feat_leaf = leaf(feat, CUDA)
    got = compiled(feat_leaf, text)
    want = segment(feat, text)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2])
    assert_close(got[3], want[3], torch.float32, "pooled")
    assert_close(got[4], want[4], torch.float32, "logits")
    got[4].sum().backward()
    assert feat_leaf.grad is not None and torch.isfinite(feat_leaf.grad).all()


# -------------------------------------------------------------------- peak memory


def peak_extra_mib(step) -> float:
    """Peak CUDA memory allocated during ``step()`` beyond what was allocated before, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def test_contrastive_loss_peak_memory_is_far_below_the_logits():
    n = m = 32768
    d = 512
    q = unit_rows(n, d, 39, torch.bfloat16).to(CUDA).requires_grad_()
    k = unit_rows(m, d, 40, torch.bfloat16).to(CUDA).requires_grad_()
    logit_scale = torch.tensor(2.659, device=CUDA, requires_grad=True)
    pos = torch.arange(n, device=CUDA)

    def step():
        mgccl_ops.contrastive_loss(q, k, pos, logit_scale.exp(), symmetric=True).backward()

    step()  # compile and autotune outside the measurement
    q.grad = k.grad = logit_scale.grad = None
    peak = peak_extra_mib(step)
    logits_mib = n * m * 4 / 2**20  # one float32 N x M matrix: 4096 MiB
    # Gradients of q and k, float32 working copies of them, O(N + M) floats, a tile workspace.
    bound = 6 * (n + m) * d * 4 / 2**20 + 64
    assert peak < bound < logits_mib / 4, f"peak {peak:.0f} MiB, bound {bound:.0f} MiB, logits {logits_mib:.0f} MiB"


def test_mining_and_hard_negative_loss_peak_memory_is_o_of_n_times_num():
    n = m = 32768
    d, num = 512, 128
    q = unit_rows(n, d, 41, torch.bfloat16).to(CUDA).requires_grad_()
    k = unit_rows(m, d, 42, torch.bfloat16).to(CUDA).requires_grad_()
    pos = torch.arange(n, device=CUDA)
    mgccl_ops.topk_hard_negatives(q, k, num, pos=pos)  # compile outside the measurement
    mining_peak = peak_extra_mib(lambda: mgccl_ops.topk_hard_negatives(q, k, num, pos=pos))
    mining_bound = 4 * n * num * (8 + 4) / 2**20 + 64  # idx and sim [N, num], some copies of them
    assert mining_bound < n * m * 4 / 2**20 / 8
    assert mining_peak < mining_bound, f"mining peak {mining_peak:.0f} MiB, bound {mining_bound:.0f} MiB"

    idx, _ = mgccl_ops.topk_hard_negatives(q, k, num, pos=pos)

    def loss_step():
        mgccl_ops.hard_negative_loss(q, k, pos, idx, 14.0).backward()

    loss_step()
    q.grad = k.grad = None
    loss_peak = peak_extra_mib(loss_step)
    gathered_mib = n * num * d * 2 / 2**20  # the [N, K, D] bf16 gather it must not build: 4096 MiB
    bound = 6 * (n + m) * d * 4 / 2**20 + 4 * n * num * 4 / 2**20 + 64
    assert loss_peak < bound < gathered_mib / 4, f"loss peak {loss_peak:.0f} MiB, bound {bound:.0f} MiB"


# -------------------------------------------------------------------- CUDA graphs


class TinyTwoTower(torch.nn.Module):
    """Two linear towers and a logit scale: enough parameters to train through every loss op."""

    def __init__(self, d_in: int, d: int):
        super().__init__()
        self.image = torch.nn.Linear(d_in, d)
        self.text = torch.nn.Linear(d_in, d)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.659))

    def forward(self, images, texts, k_group, pixel_pos, pixel_group):
        q = torch.nn.functional.normalize(self.image(images), dim=1)
        k = torch.nn.functional.normalize(self.text(texts), dim=1)
        scale = self.logit_scale.exp()
        n = q.shape[0]
        clip = mgccl_ops.contrastive_loss(q, k, torch.arange(n, device=q.device), scale, symmetric=True)
        pixels = q.repeat_interleave(4, dim=0) * 0.5 + 0.5 * q.roll(1, 0).repeat_interleave(4, dim=0)
        total, _ = mgccl_ops.multi_grained_loss(
            [(q, torch.arange(n, device=q.device), 1.0, k_group), (pixels, pixel_pos, 0.5, pixel_group)],
            k, scale, k_group=k_group, hard_negatives=8,
        )  # fmt: skip
        return clip + total


def training_batch(step: int, n: int, d_in: int):
    generator = torch.Generator().manual_seed(100 + step)
    images = torch.randn(n, d_in, generator=generator)
    texts = torch.randn(n, d_in, generator=generator)
    return images.to(CUDA), texts.to(CUDA)


def test_training_step_captured_in_a_cuda_graph_equals_eager_steps():
    n, d_in, d = 128, 48, 32
    torch.manual_seed(0)
    eager_model = TinyTwoTower(d_in, d).to(CUDA)
    graph_model = TinyTwoTower(d_in, d).to(CUDA)
    graph_model.load_state_dict(eager_model.state_dict())
    k_group = (torch.arange(n, device=CUDA) // 2).contiguous()
    pixel_pos = torch.arange(n, device=CUDA).repeat_interleave(4)
    pixel_group = k_group[pixel_pos]
    fixed = (k_group, pixel_pos, pixel_group)
    eager_opt = torch.optim.SGD(eager_model.parameters(), lr=0.05)
    graph_opt = torch.optim.SGD(graph_model.parameters(), lr=0.05)

    static_images, static_texts = training_batch(0, n, d_in)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (kernel compilation, autotuning) outside the capture
        for _ in range(3):
            graph_opt.zero_grad(set_to_none=True)
            graph_model(static_images, static_texts, *fixed).backward()
    torch.cuda.current_stream().wait_stream(side)  # (no optimiser step yet: the models are still equal)
    graph = torch.cuda.CUDAGraph()
    graph_opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = graph_model(static_images, static_texts, *fixed)
        static_loss.backward()
        graph_opt.step()

    for step in range(3):
        images, texts = training_batch(step + 1, n, d_in)
        static_images.copy_(images)
        static_texts.copy_(texts)
        graph.replay()
        eager_opt.zero_grad(set_to_none=True)
        eager_loss = eager_model(images, texts, *fixed)
        eager_loss.backward()
        eager_opt.step()
        assert_close(static_loss, eager_loss.detach(), torch.float32, f"loss at step {step}")
    for (name, a), b in zip(graph_model.named_parameters(), eager_model.parameters()):
        assert_close(a.detach(), b.detach(), torch.float32, f"{name} after 3 steps")


# -------------------------------------------------------------------- both providers


PROVIDER_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, mgccl_ops
    from mgccl_ops.ops import devices
    inputs = torch.load(sys.argv[1])
    q, k, scale = (inputs[name].cuda().requires_grad_() for name in ("q", "k", "scale"))
    loss = mgccl_ops.contrastive_loss(q, k, inputs["pos"].cuda(), scale, weight=inputs["weight"].cuda())
    loss.backward()
    mining_error = None
    if devices.kernel_origin("topk_hard_negatives", "cuda") is None:
        try:
            mgccl_ops.topk_hard_negatives(q, k, 3)
        except NotImplementedError as error:
            mining_error = str(error)
    torch.save({"loss": loss.detach().cpu(), "grad_q": q.grad.cpu(), "grad_k": k.grad.cpu(),
                "grad_scale": scale.grad.cpu()}, sys.argv[2])
    print(json.dumps({"origin": devices.kernel_origin("contrastive_loss", "cuda"), "mining_error": mining_error}))
    """
)


@pytest.mark.parametrize(("provider", "origin"), [("triton", "Python"), ("cuda", "CUDA C++")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_both_gpu_providers_of_contrastive_loss_match_the_cpu_kernel(tmp_path, provider, origin, dtype):
    if provider == "cuda" and not mgccl_ops.build_info()["with_cuda"]:
        pytest.skip("this build has no CUDA C++ kernels")
    q, k = unit_rows(300, 96, 43, dtype), unit_rows(500, 96, 44, dtype)
    pos = torch.randint(-1, 500, (300,), generator=torch.Generator().manual_seed(45))
    weight = torch.rand(300, generator=torch.Generator().manual_seed(46)).to(dtype)
    inputs = {"q": q, "k": k, "pos": pos, "scale": torch.tensor(11.0), "weight": weight}
    torch.save(inputs, tmp_path / "inputs.pt")
    env = os.environ | {"MGCCL_GPU_KERNELS": provider}
    env.pop("MGCCL_TRITON_ON_CPU", None)
    result = subprocess.run(
        [sys.executable, "-c", PROVIDER_SCRIPT, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts["origin"] == origin, f"MGCCL_GPU_KERNELS={provider} ran the {facts['origin']} kernel"
    if facts["mining_error"] is not None:  # an op without a kernel of this provider names op and device
        assert "topk_hard_negatives has no kernel for device 'cuda'" in facts["mining_error"]
    got = torch.load(tmp_path / "out.pt")
    expected = contrastive_run("cpu", q, k, pos, inputs["scale"], weight, "mean", False, torch.tensor(1.0))
    for name, e in zip(("loss", "grad_q", "grad_k", "grad_scale"), expected):
        assert_close(got[name], e, dtype, f"{provider}: {name}")


def test_the_device_table_has_a_cuda_kernel_for_every_operator():
    missing = [name for name, origins in devices.device_table().items() if origins["cuda"] is None]
    assert not missing, f"no CUDA kernel for {missing}"
