"""The CUDA kernel of ``contrastive_loss`` against the plain-PyTorch reference and the CPU kernel.

Every test here needs a GPU (``conftest.py`` skips the ``gpu`` marker where there is none).
The reference runs in float64 on the same device from the same (possibly half-precision)
inputs, so differences measure only the kernel's float32 accumulation and output rounding.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from compare import assert_close
from hypothesis import given
from hypothesis import strategies as st

import mgccl_ops
from mgccl_ops import reference

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REDUCTIONS = ["mean", "sum", "none"]


def make_inputs(
    n: int,
    m: int,
    d: int,
    dtype: torch.dtype,
    *,
    symmetric: bool = False,
    weighted: bool = False,
    ignored: float = 0.0,
    seed: int = 0,
) -> dict:
    """Unit-norm q [n, d] and k [m, d], pos [n], scale (0-dim, accumulation dtype), weight [n] or
    None, and an upstream gradient for each reduction, all on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(m, d, generator=gen, dtype=torch.float64), dim=-1)
    if symmetric:
        pos = torch.randperm(n, generator=gen)
    elif m > 0:
        pos = torch.randint(0, m, (n,), generator=gen)
        pos[torch.rand(n, generator=gen, dtype=torch.float64) < ignored] = -1
    else:
        pos = torch.full((n,), -1, dtype=torch.int64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return {
        "q": q.to(dtype),
        "k": k.to(dtype),
        "pos": pos,
        "scale": torch.tensor(12.5, dtype=acc),
        "weight": torch.rand(n, generator=gen, dtype=torch.float64).add(0.5).to(dtype) if weighted else None,
        "upstream_rows": torch.randn(n, generator=gen, dtype=torch.float64),
        "upstream_scalar": torch.tensor(0.75, dtype=torch.float64),
    }


def run(fn, inputs: dict, reduction: str, symmetric: bool, device: str, dtype: torch.dtype | None = None):
    """Loss and gradients (q, k, scale) of ``fn`` on ``device``, inputs cast to ``dtype`` if given.

    A gradient that does not reach its input (the reference with an empty side) reads as zeros.
    """

    def leaf(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device=device, dtype=dtype or t.dtype)
        return t.detach().requires_grad_()

    q, k, scale = leaf(inputs["q"]), leaf(inputs["k"]), leaf(inputs["scale"])
    weight = inputs["weight"]
    if weight is not None:
        weight = weight.to(device=device, dtype=dtype or weight.dtype)
    loss = fn(q, k, inputs["pos"].to(device), scale, weight=weight, reduction=reduction, symmetric=symmetric)
    upstream = inputs["upstream_rows"] if reduction == "none" else inputs["upstream_scalar"]
    loss.backward(upstream.to(device=device, dtype=loss.dtype))
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in (q, k, scale)]
    return [loss.detach(), *grads]


def check_against_reference(inputs: dict, dtype: torch.dtype, reduction: str, symmetric: bool) -> None:
    ours = run(mgccl_ops.contrastive_loss, inputs, reduction, symmetric, "cuda")
    expected = run(reference.contrastive_loss, inputs, reduction, symmetric, "cuda", torch.float64)
    for name, a, e in zip(("loss", "grad_q", "grad_k", "grad_scale"), ours, expected):
        if name in ("grad_q", "grad_k"):
            assert a.dtype == dtype, f"{name}: dtype {a.dtype}, expected the input dtype {dtype}"
        assert a.device.type == "cuda", f"{name} is on {a.device}"
        assert_close(a, e, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_reference(dtype, reduction, symmetric, weighted):
    n, m = (37, 37) if symmetric else (37, 53)
    inputs = make_inputs(n, m, 24, dtype, symmetric=symmetric, weighted=weighted, ignored=0.2)
    check_against_reference(inputs, dtype, reduction, symmetric)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    ("n", "m", "d", "symmetric"),
    [
        (1, 1, 1, False),
        (1, 1, 1, True),
        (1, 9, 5, False),
        (7, 1, 3, False),
        (6, 5, 1, False),
        (9, 9, 1, True),
        (11, 19, 129, False),
        (13, 13, 129, True),
        (0, 6, 8, False),
        (0, 0, 8, True),
        (4, 0, 8, False),
        (300, 700, 129, False),
        (300, 300, 129, True),
    ],
)
def test_odd_shapes(dtype, reduction, n, m, d, symmetric):
    inputs = make_inputs(n, m, d, dtype, symmetric=symmetric, weighted=True, seed=n + m + d)
    check_against_reference(inputs, dtype, reduction, symmetric)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored(reduction):
    """No valid row: the loss is 0 (a mean over no rows too) and so are all gradients."""
    inputs = make_inputs(8, 5, 4, torch.float32, ignored=1.0)
    loss, grad_q, grad_k, grad_scale = run(mgccl_ops.contrastive_loss, inputs, reduction, False, "cuda")
    for name, value in (("loss", loss), ("grad_q", grad_q), ("grad_k", grad_k), ("grad_scale", grad_scale)):
        assert_close(value, torch.zeros_like(value), torch.float32, name)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_several_tiles(reduction, symmetric):
    """N = 4101 rows against 4096 (or 4101) keys: three 32 MiB float32 tiles, the last partial."""
    n = 2 * 2048 + 5
    m = n if symmetric else 4096
    inputs = make_inputs(n, m, 32, torch.float32, symmetric=symmetric, weighted=True, ignored=0.1)
    check_against_reference(inputs, torch.float32, reduction, symmetric)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_noncontiguous_inputs(reduction):
    """q a strided view and k a transposed one: the same results as contiguous copies."""
    inputs = make_inputs(21, 17, 10, torch.float32, weighted=True)
    expected = run(mgccl_ops.contrastive_loss, inputs, reduction, False, "cuda")
    q_wide = torch.stack([inputs["q"], torch.ones_like(inputs["q"])], dim=-1).flatten(1).cuda().requires_grad_()
    k_columns = inputs["k"].t().contiguous().cuda().requires_grad_()
    scale = inputs["scale"].cuda().requires_grad_()
    q, k = q_wide[:, ::2], k_columns.t()
    assert not q.is_contiguous() and not k.is_contiguous()
    loss = mgccl_ops.contrastive_loss(
        q, k, inputs["pos"].cuda(), scale, weight=inputs["weight"].cuda(), reduction=reduction
    )
    upstream = inputs["upstream_rows"] if reduction == "none" else inputs["upstream_scalar"]
    loss.backward(upstream.to(device="cuda", dtype=loss.dtype))
    ours = [loss.detach(), q_wide.grad[:, ::2], k_columns.grad.t(), scale.grad]
    for name, a, e in zip(("loss", "grad_q", "grad_k", "grad_scale"), ours, expected):
        assert_close(a, e, torch.float32, name)
    assert_close(q_wide.grad[:, 1::2], torch.zeros_like(q), torch.float32, "grad of the unused columns")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_matches_cpu_kernel(dtype, reduction, symmetric):
    n, m = (45, 45) if symmetric else (45, 31)
    inputs = make_inputs(n, m, 33, dtype, symmetric=symmetric, weighted=True, ignored=0.2)
    on_gpu = run(mgccl_ops.contrastive_loss, inputs, reduction, symmetric, "cuda")
    on_cpu = run(mgccl_ops.contrastive_loss, inputs, reduction, symmetric, "cpu")
    for name, a, e in zip(("loss", "grad_q", "grad_k", "grad_scale"), on_gpu, on_cpu):
        assert a.dtype == e.dtype, f"{name}: CUDA dtype {a.dtype}, CPU dtype {e.dtype}"
        assert_close(a, e, dtype, name)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_gradcheck_float64(reduction, symmetric):
    n, m = (6, 6) if symmetric else (5, 7)
    inputs = make_inputs(n, m, 3, torch.float64, symmetric=symmetric, weighted=True, ignored=0.2)
    pos, weight = inputs["pos"].cuda(), inputs["weight"].cuda()

    def loss(q, k, scale):
        return mgccl_ops.contrastive_loss(q, k, pos, scale, weight=weight, reduction=reduction, symmetric=symmetric)

    leaves = [inputs[name].cuda().requires_grad_() for name in ("q", "k", "scale")]
    assert torch.autograd.gradcheck(loss, leaves)


@given(
    n=st.integers(0, 40),
    m=st.integers(1, 40),
    d=st.integers(1, 70),
    dtype=st.sampled_from(DTYPES),
    reduction=st.sampled_from(REDUCTIONS),
    symmetric=st.booleans(),
    weighted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(n, m, d, dtype, reduction, symmetric, weighted, seed):
    if symmetric:
        m = n
    inputs = make_inputs(n, m, d, dtype, symmetric=symmetric, weighted=weighted, ignored=0.3, seed=seed)
    check_against_reference(inputs, dtype, reduction, symmetric)


OPCHECK_SAMPLES = [
    (symmetric, reduction, dtype, [True, True, True], True)
    for symmetric in (False, True)
    for reduction in REDUCTIONS
    for dtype in (torch.float32, torch.bfloat16)
] + [  # some gradients asked for, or none
    (symmetric, "mean", torch.float32, grad_mask, False)
    for symmetric in (False, True)
    for grad_mask in ([False, False, True], [True, False, False], [False, False, False])
]


@pytest.mark.parametrize(("symmetric", "reduction", "dtype", "grad_mask", "weighted"), OPCHECK_SAMPLES)
def test_opcheck(symmetric, reduction, dtype, grad_mask, weighted):
    inputs = make_inputs(10, 10 if symmetric else 7, 6, dtype, symmetric=symmetric, weighted=weighted)
    q, k, pos, scale = (inputs[name].cuda() for name in ("q", "k", "pos", "scale"))
    for tensor, wanted in zip((q, k, scale), grad_mask):
        tensor.requires_grad_(wanted)
    weight = inputs["weight"].cuda() if weighted else None
    args = (q, k, pos, scale, weight, reduction, symmetric, grad_mask)
    torch.library.opcheck(torch.ops.mgccl.contrastive_loss.default, args)


@pytest.mark.parametrize("symmetric", [False, True])
def test_opcheck_backward(symmetric):
    inputs = make_inputs(9, 9 if symmetric else 4, 5, torch.float32, symmetric=symmetric)
    q, k, pos, scale = (inputs[name].cuda() for name in ("q", "k", "pos", "scale"))
    _, row_lse, col_lse, *_ = torch.ops.mgccl.contrastive_loss.default(
        q, k, pos, scale, None, "none", symmetric, [False, False, False]
    )
    row_grad = inputs["upstream_rows"].float().cuda()
    args = (row_grad, q, k, pos, scale, row_lse, col_lse, symmetric, [True, True, True])
    torch.library.opcheck(torch.ops.mgccl.contrastive_loss_backward.default, args)


@pytest.mark.parametrize(("reduction", "symmetric"), [("mean", False), ("mean", True), ("none", False)])
def test_peak_memory_far_below_logits(reduction, symmetric):
    """At N = M = 8192 the float32 logits take 256 MiB; forward + backward stays under a quarter."""
    n = m = 8192
    inputs = make_inputs(n, m, 64, torch.float32, symmetric=symmetric)
    warm_up = make_inputs(64, 64, 64, torch.float32, symmetric=symmetric)
    run(mgccl_ops.contrastive_loss, warm_up, reduction, symmetric, "cuda")  # cuBLAS workspaces
    q, k, pos, scale = (inputs[name].cuda() for name in ("q", "k", "pos", "scale"))
    q.requires_grad_()
    k.requires_grad_()
    scale.requires_grad_()
    upstream = inputs["upstream_rows" if reduction == "none" else "upstream_scalar"].float().cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = mgccl_ops.contrastive_loss(q, k, pos, scale, reduction=reduction, symmetric=symmetric)
    loss.backward(upstream)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    logits_bytes = n * m * 4
    assert extra < logits_bytes // 4, (
        f"peak extra memory {extra / 2**20:.1f} MiB, logits {logits_bytes / 2**20:.0f} MiB"
    )


def count_syncs(inputs: dict, reduction: str, symmetric: bool) -> int:
    """Host-device synchronisations of one forward + backward."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run(mgccl_ops.contrastive_loss, inputs, reduction, symmetric, "cuda")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_no_sync_per_tile(reduction, symmetric):
    """Only the argument checks at entry wait for the device, not the loop over tiles."""
    one_tile = make_inputs(64, 64 if symmetric else 4096, 16, torch.float32, symmetric=symmetric)
    n = 2 * 2048 + 5
    three_tiles = make_inputs(n, n if symmetric else 4096, 16, torch.float32, symmetric=symmetric)
    count_syncs(one_tile, reduction, symmetric)  # first-call set-up is not what is compared
    assert count_syncs(three_tiles, reduction, symmetric) == count_syncs(one_tile, reduction, symmetric)


def test_bad_values_raise():
    q, k = torch.randn(4, 3, device="cuda"), torch.randn(5, 3, device="cuda")
    pos = torch.tensor([0, 1, 2, 3], device="cuda")
    with pytest.raises(RuntimeError, match=r"pos values should lie in \[-1, 5\), got min -2 and max 3"):
        mgccl_ops.contrastive_loss(q, k, torch.tensor([0, -2, 1, 3], device="cuda"), 1.0)
    with pytest.raises(RuntimeError, match=r"pos values should lie in \[-1, 5\), got min 0 and max 5"):
        mgccl_ops.contrastive_loss(q, k, torch.tensor([0, 5, 1, 3], device="cuda"), 1.0)
    with pytest.raises(RuntimeError, match="scale should be finite, got inf"):
        mgccl_ops.contrastive_loss(q, k, pos, torch.tensor(float("inf"), device="cuda"))
    with pytest.raises(RuntimeError, match="permutation of 0..M-1"):
        mgccl_ops.contrastive_loss(q, q, torch.tensor([0, 1, 1, 3], device="cuda"), 1.0, symmetric=True)
    with pytest.raises(RuntimeError, match=r"pos values should lie in \[0, 4\)"):
        mgccl_ops.contrastive_loss(q, q, torch.tensor([0, 1, -1, 3], device="cuda"), 1.0, symmetric=True)


def test_mixed_devices_raise():
    q, k = torch.randn(4, 3, device="cuda"), torch.randn(5, 3)
    pos, scale = torch.zeros(4, dtype=torch.int64, device="cuda"), torch.tensor(1.0, device="cuda")
    with pytest.raises(ValueError, match="k is on cpu but q is on cuda"):
        mgccl_ops.contrastive_loss(q, k, pos, scale)
    # The kernel's own check, reached without the Python wrapper.
    with pytest.raises(RuntimeError, match="k is on cpu but q is on cuda"):
        torch.ops.mgccl.contrastive_loss.default(q, k, pos, scale, None, "mean", False, [False] * 3)


def test_backward_checks_saved_statistics():
    q, pos, scale = torch.randn(4, 3, device="cuda"), torch.arange(4, device="cuda"), torch.tensor(2.0, device="cuda")
    row_grad, row_lse = torch.ones(4, device="cuda"), torch.zeros(4, device="cuda")
    with pytest.raises(RuntimeError, match=r"col_lse.shape\[0\] should equal k.shape\[0\] = 4"):
        torch.ops.mgccl.contrastive_loss_backward.default(
            row_grad, q, q, pos, scale, row_lse, torch.zeros(3, device="cuda"), True, [True] * 3
        )
    with pytest.raises(RuntimeError, match=r"row_lse.shape\[0\] should equal q.shape\[0\] = 4"):
        torch.ops.mgccl.contrastive_loss_backward.default(
            row_grad, q, q, pos, scale, row_lse[:2], torch.zeros(0, device="cuda"), False, [True] * 3
        )
