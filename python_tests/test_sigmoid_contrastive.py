"""sigmoid_contrastive_loss (the SigLIP pairwise-sigmoid loss) against its reference and open_clip."""

from __future__ import annotations

import pytest
import torch
from compare import assert_close
from hypothesis import given
from hypothesis import strategies as st

import mgccl_ops
from mgccl_ops import reference

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def make_inputs(n, m, d, dtype, seed=0, scale=10.0, bias=-10.0):
    """L2-normalised features (as SigLIP trains them) and scale/bias tensors that need grad."""
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1).to(dtype).requires_grad_()
    param = torch.float64 if dtype == torch.float64 else torch.float32
    scale_t = torch.tensor(scale, dtype=param, requires_grad=True)
    bias_t = torch.tensor(bias, dtype=param, requires_grad=True)
    return q, k, scale_t, bias_t


def value_and_grads(fn, q, k, scale, bias):
    for t in (q, k, scale, bias):
        t.grad = None
    loss = fn(q, k, scale, bias)
    loss.backward()
    return loss.detach(), q.grad, k.grad, scale.grad, bias.grad


def assert_matches_reference(q, k, scale, bias, dtype):
    ours = value_and_grads(mgccl_ops.sigmoid_contrastive_loss, q, k, scale, bias)
    ref = value_and_grads(reference.sigmoid_contrastive_loss, q, k, scale, bias)
    for name, a, b in zip(("loss", "grad_q", "grad_k", "grad_scale", "grad_bias"), ours, ref):
        assert a.dtype == b.dtype, f"{name}: {a.dtype} != {b.dtype}"
        assert_close(a, b, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 64, 32), (37, 53, 17), (300, 300, 8), (600, 530, 3)])
def test_matches_reference(dtype, shape):
    assert_matches_reference(*make_inputs(*shape, dtype), dtype)


@pytest.mark.parametrize("scale, bias", [(1.0, 0.0), (100.0, -30.0), (0.0, 5.0), (-3.0, 2.0)])
def test_extreme_logits(scale, bias):
    """Large |z| (sigmoid saturating, softplus near-linear) and a zero scale."""
    assert_matches_reference(*make_inputs(50, 50, 8, torch.float64, scale=scale, bias=bias), torch.float64)
    assert_matches_reference(*make_inputs(50, 50, 8, torch.float32, scale=scale, bias=bias), torch.float32)


def test_equals_open_clip_siglip():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    q, k, scale, bias = make_inputs(96, 96, 24, torch.float32, seed=3)
    ours = value_and_grads(mgccl_ops.sigmoid_contrastive_loss, q, k, scale, bias)
    theirs = value_and_grads(open_clip_loss.SigLipLoss(), q, k, scale, bias)
    for name, a, b in zip(("loss", "grad_q", "grad_k", "grad_scale", "grad_bias"), ours, theirs):
        assert_close(a, b, torch.float32, name)


def test_float_scale_and_bias():
    q, k, scale, bias = make_inputs(20, 20, 6, torch.float64)
    loss = mgccl_ops.sigmoid_contrastive_loss(q, k, 2.5, -1.0)
    assert_close(loss, reference.sigmoid_contrastive_loss(q, k, 2.5, -1.0), torch.float64)


def test_gradients_only_where_required():
    q, k, scale, bias = make_inputs(10, 12, 4, torch.float32)
    k.requires_grad_(False)
    bias.requires_grad_(False)
    mgccl_ops.sigmoid_contrastive_loss(q, k, scale, bias).backward()
    assert q.grad is not None and scale.grad is not None
    assert k.grad is None and bias.grad is None
    # scale alone (its gradient needs g @ k although grad_q is not asked for).
    q2, k2, scale2, bias2 = make_inputs(10, 12, 4, torch.float64)
    q2.requires_grad_(False)
    k2.requires_grad_(False)
    ours = value_and_grads(mgccl_ops.sigmoid_contrastive_loss, q2, k2, scale2, bias2)
    ref = value_and_grads(reference.sigmoid_contrastive_loss, q2, k2, scale2, bias2)
    assert_close(ours[3], ref[3], torch.float64, "grad_scale")


def test_incoming_gradient_scales_everything():
    q, k, scale, bias = make_inputs(30, 30, 5, torch.float64)
    (3.5 * mgccl_ops.sigmoid_contrastive_loss(q, k, scale, bias)).backward()
    ours = (q.grad, k.grad, scale.grad, bias.grad)
    for t in (q, k, scale, bias):
        t.grad = None
    (3.5 * reference.sigmoid_contrastive_loss(q, k, scale, bias)).backward()
    for a, b in zip(ours, (q.grad, k.grad, scale.grad, bias.grad)):
        assert_close(a, b, torch.float64)


def test_gradcheck():
    q, k, scale, bias = make_inputs(7, 9, 3, torch.float64, scale=2.0, bias=-1.0)
    assert torch.autograd.gradcheck(mgccl_ops.sigmoid_contrastive_loss, (q, k, scale, bias))


@pytest.mark.parametrize("n, m", [(0, 5), (5, 0), (0, 0)])
def test_empty_inputs(n, m):
    q, k, scale, bias = make_inputs(n, m, 4, torch.float32)
    loss, gq, gk, gs, gb = value_and_grads(mgccl_ops.sigmoid_contrastive_loss, q, k, scale, bias)
    ref = value_and_grads(reference.sigmoid_contrastive_loss, q, k, scale, bias)
    assert loss.item() == 0.0 and not loss.isnan()
    assert gq.shape == (n, 4) and gk.shape == (m, 4)
    for a, b in zip((loss, gq, gk, gs, gb), ref):
        assert_close(a, b, torch.float32)


def test_zero_width_features():
    q, k, scale, bias = make_inputs(6, 6, 0, torch.float32)
    assert_matches_reference(q, k, scale, bias, torch.float32)


def test_double_backward_is_refused():
    q, k, scale, bias = make_inputs(8, 8, 4, torch.float64)
    loss = mgccl_ops.sigmoid_contrastive_loss(q, k, scale, bias)
    with pytest.raises(RuntimeError, match="double backward is not supported by sigmoid_contrastive_loss"):
        torch.autograd.grad(loss, q, create_graph=True)


def test_opcheck():
    q, k, scale, bias = make_inputs(9, 11, 5, torch.float32)
    for grad_mask in ([True, True, True, True], [False, False, False, False], [True, False, True, False]):
        torch.library.opcheck(
            torch.ops.mgccl.sigmoid_contrastive_loss.default,
            (q.detach(), k.detach(), scale.detach(), bias.detach(), grad_mask),
        )


def test_compile_fullgraph():
    q, k, scale, bias = make_inputs(9, 9, 5, torch.float32)
    compiled = torch.compile(mgccl_ops.sigmoid_contrastive_loss, fullgraph=True, backend="aot_eager")
    ours = value_and_grads(compiled, q, k, scale, bias)
    ref = value_and_grads(reference.sigmoid_contrastive_loss, q, k, scale, bias)
    for a, b in zip(ours, ref):
        assert_close(a, b, torch.float32)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"q": torch.randn(4, 3, 2)}, ValueError, r"q should be a 2-D tensor \[N, D\], got 3-D"),
        ({"k": torch.randn(5, 4)}, ValueError, r"k.shape\[1\] should equal q.shape\[1\] \(D\) = 3"),
        ({"k": torch.randn(5, 3, dtype=torch.float64)}, ValueError, "k has dtype torch.float64 but q"),
        ({"q": torch.ones(4, 3, dtype=torch.int64)}, ValueError, "q should be float16, bfloat16, float32 or float64"),
        ({"scale": torch.ones(2)}, ValueError, r"scale should be a float or a 0-dim tensor, got shape \(2,\)"),
        ({"bias": torch.tensor(1)}, ValueError, "bias should be a floating tensor, got torch.int64"),
        ({"bias": float("inf")}, ValueError, "bias should be finite, got inf"),
        ({"scale": torch.tensor(float("nan"))}, RuntimeError, "scale should be finite, got nan"),
        ({"bias": "x"}, TypeError, "bias should be a float or a 0-dim tensor, got str"),
    ],
)
def test_bad_input(change, error, match):
    args = {"q": torch.randn(4, 3), "k": torch.randn(5, 3), "scale": 1.0, "bias": 0.0} | change
    with pytest.raises(error, match=match):
        mgccl_ops.sigmoid_contrastive_loss(args["q"], args["k"], args["scale"], args["bias"])


@given(
    n=st.integers(0, 40),
    m=st.integers(0, 40),
    d=st.integers(1, 9),
    scale=st.floats(-20, 20),
    bias=st.floats(-20, 20),
    seed=st.integers(0, 2**16),
)
def test_properties(n, m, d, scale, bias, seed):
    """Equal to the reference in float64 for any shapes, scales and biases, and never negative."""
    q, k, scale_t, bias_t = make_inputs(n, m, d, torch.float64, seed, scale, bias)
    ours = value_and_grads(mgccl_ops.sigmoid_contrastive_loss, q, k, scale_t, bias_t)
    ref = value_and_grads(reference.sigmoid_contrastive_loss, q, k, scale_t, bias_t)
    assert ours[0].item() >= 0.0
    for a, b in zip(ours, ref):
        assert_close(a, b, torch.float64)
