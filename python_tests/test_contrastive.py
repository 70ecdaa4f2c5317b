"""contrastive_loss (DESIGN.md op 1) on the CPU against its plain-PyTorch reference and open_clip."""

from __future__ import annotations

import pytest
import torch
from compare import assert_close
from hypothesis import given
from hypothesis import strategies as st

import mgccl_ops
from mgccl_ops import reference
from mgccl_ops.bench import harness

LOW_PRECISION = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1, 1), (7, 13, 5), (33, 33, 129), (50, 3, 17)]


def make_inputs(n, m, d, dtype, *, symmetric=False, ignore_some=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=generator).to(dtype).requires_grad_()
    k = torch.randn(m, d, generator=generator).to(dtype).requires_grad_()
    if symmetric:
        pos = torch.randperm(n, generator=generator)
    else:
        pos = torch.randint(-1 if ignore_some else 0, m, (n,), generator=generator)
    weight = torch.rand(n, generator=generator, dtype=torch.float64).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(1.7, dtype=acc, requires_grad=True)
    return q, k, pos, weight, scale


def values_and_grads(fn, q, k, pos, scale, upstream, **kwargs):
    loss = fn(q, k, pos, scale, **kwargs)
    grads = torch.autograd.grad(loss, (q, k, scale), upstream(loss))
    return loss, grads


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_reference(dtype, shape, reduction, weighted):
    n, m, d = shape
    q, k, pos, weight, scale = make_inputs(n, m, d, dtype)
    kwargs = {"weight": weight if weighted else None, "reduction": reduction}
    generator = torch.Generator().manual_seed(1)

    def upstream(loss):
        return torch.randn(loss.shape, generator=generator).to(loss.dtype)

    ours, our_grads = values_and_grads(mgccl_ops.contrastive_loss, q, k, pos, scale, upstream, **kwargs)
    generator.manual_seed(1)
    ref, ref_grads = values_and_grads(reference.contrastive_loss, q, k, pos, scale, upstream, **kwargs)
    assert ours.dtype == torch.float32
    assert_close(ours, ref, dtype, "loss")
    for name, ours_grad, ref_grad in zip(("grad q", "grad k", "grad scale"), our_grads, ref_grads):
        assert ours_grad.dtype == ref_grad.dtype
        assert_close(ours_grad, ref_grad, dtype, name)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("n,d", [(1, 1), (9, 4), (40, 129)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_symmetric_matches_reference(dtype, n, d, reduction):
    q, k, pos, weight, scale = make_inputs(n, n, d, dtype, symmetric=True)
    kwargs = {"weight": weight, "reduction": reduction, "symmetric": True}

    def upstream(loss):
        return torch.linspace(-1, 1, loss.numel()).reshape(loss.shape)

    ours, our_grads = values_and_grads(mgccl_ops.contrastive_loss, q, k, pos, scale, upstream, **kwargs)
    ref, ref_grads = values_and_grads(reference.contrastive_loss, q, k, pos, scale, upstream, **kwargs)
    assert_close(ours, ref, dtype, "loss")
    for name, ours_grad, ref_grad in zip(("grad q", "grad k", "grad scale"), our_grads, ref_grads):
        assert_close(ours_grad, ref_grad, dtype, name)


def test_reference_equals_cross_entropy():
    """The reference itself against torch's cross_entropy on the explicit logits."""
    q, k, pos, _, scale = make_inputs(20, 11, 6, torch.float64)
    expected = torch.nn.functional.cross_entropy(scale * q @ k.T, pos, ignore_index=-1)
    assert_close(reference.contrastive_loss(q, k, pos, scale), expected, torch.float64)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gradcheck_float64(reduction, symmetric):
    q, k, pos, weight, scale = make_inputs(6, 6, 3, torch.float64, symmetric=symmetric)

    def loss(q, k, scale):
        return mgccl_ops.contrastive_loss(q, k, pos, scale, weight=weight, reduction=reduction, symmetric=symmetric)

    assert torch.autograd.gradcheck(loss, (q, k, scale))


def test_symmetric_equals_open_clip():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    generator = torch.Generator().manual_seed(3)
    image = torch.nn.functional.normalize(torch.randn(64, 32, generator=generator), dim=1)
    text = torch.nn.functional.normalize(torch.randn(64, 32, generator=generator), dim=1)
    logit_scale = torch.tensor(2.659)
    expected = open_clip_loss.ClipLoss()(image, text, logit_scale.exp())
    ours = mgccl_ops.contrastive_loss(image, text, torch.arange(64), logit_scale.exp(), symmetric=True)
    assert_close(ours, expected, torch.float32, "ClipLoss")


def test_empty_queries_give_zero_loss_and_gradients():
    q = torch.zeros(0, 8, requires_grad=True)
    k = torch.randn(5, 8, requires_grad=True)
    pos = torch.zeros(0, dtype=torch.int64)
    loss = mgccl_ops.contrastive_loss(q, k, pos, 2.0)
    loss.backward()
    assert loss.item() == 0.0
    assert q.grad.shape == (0, 8)
    assert torch.equal(k.grad, torch.zeros(5, 8))
    assert mgccl_ops.contrastive_loss(q, k, pos, 2.0, reduction="none").shape == (0,)


def test_empty_key_bank_with_all_rows_ignored():
    q = torch.randn(4, 3, requires_grad=True)
    k = torch.zeros(0, 3, requires_grad=True)
    pos = torch.full((4,), -1)
    loss = mgccl_ops.contrastive_loss(q, k, pos, 1.0)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(q.grad, torch.zeros(4, 3))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(reduction):
    q, k, _, weight, scale = make_inputs(5, 4, 3, torch.float32)
    pos = torch.full((5,), -1)
    loss = mgccl_ops.contrastive_loss(q, k, pos, scale, weight=weight, reduction=reduction)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(q.grad, torch.zeros_like(q)) and torch.equal(k.grad, torch.zeros_like(k))
    assert scale.grad.item() == 0.0 and not torch.isnan(scale.grad)


def test_zero_weights_mean_is_zero_without_nan():
    q, k, pos, _, scale = make_inputs(5, 4, 3, torch.float32, ignore_some=False)
    loss = mgccl_ops.contrastive_loss(q, k, pos, scale, weight=torch.zeros(5))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(q.grad).all()


def test_python_float_scale_and_no_grad():
    q, k, pos, _, _ = make_inputs(9, 7, 4, torch.float32)
    with torch.no_grad():
        ours = mgccl_ops.contrastive_loss(q, k, pos, 0.5)
    assert not ours.requires_grad
    assert_close(ours, reference.contrastive_loss(q, k, pos, 0.5), torch.float32)


def test_gradient_only_for_tensors_that_need_it():
    q, k, pos, _, _ = make_inputs(9, 7, 4, torch.float32)
    k = k.detach()
    mgccl_ops.contrastive_loss(q, k, pos, 3.0).backward()
    assert q.grad is not None and k.grad is None


def test_non_contiguous_inputs():
    q, k, pos, weight, scale = make_inputs(12, 10, 6, torch.float32)
    q_t = q.detach().T.contiguous().T  # same values, column-major strides
    k_wide = torch.stack([k.detach(), -k.detach()], dim=2)[:, :, 0]  # same values, stride 2
    assert not q_t.is_contiguous() and not k_wide.is_contiguous()
    ours = mgccl_ops.contrastive_loss(q_t, k_wide, pos, scale, weight=weight)
    assert_close(ours, reference.contrastive_loss(q, k, pos, scale, weight=weight), torch.float32)


@given(
    n=st.integers(0, 24),
    m=st.integers(1, 24),
    d=st.integers(1, 9),
    scale=st.floats(-5, 5),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference_float64(n, m, d, scale, reduction, seed):
    q, k, pos, weight, _ = make_inputs(n, m, d, torch.float64, seed=seed)
    ours = mgccl_ops.contrastive_loss(q, k, pos, scale, weight=weight, reduction=reduction)
    ref = reference.contrastive_loss(q, k, pos, scale, weight=weight, reduction=reduction)
    assert_close(ours, ref, torch.float64)
    if reduction != "none":
        assert ours.item() >= 0 or scale < 0 or weight.min() < 0 or ours.item() > -1e-9


def opcheck_samples():
    samples = []
    for symmetric, reduction in [(False, "mean"), (False, "none"), (True, "sum"), (True, "none")]:
        q, k, pos, weight, scale = make_inputs(6, 6, 5, torch.float32, symmetric=symmetric)
        for grad_mask in ([True, True, True], [True, False, False], [False, False, False]):
            samples.append((q, k, pos, scale, weight, reduction, symmetric, grad_mask))
    return samples


@pytest.mark.parametrize("sample", opcheck_samples())
def test_opcheck(sample):
    torch.library.opcheck(torch.ops.mgccl.contrastive_loss.default, sample)


def test_opcheck_backward():
    q, k, pos, _, scale = make_inputs(6, 4, 5, torch.float32)
    _, row_lse, col_lse, *_ = torch.ops.mgccl.contrastive_loss.default(
        q, k, pos, scale, None, "none", False, [False, False, False]
    )
    # row_lse and col_lse detached: the backward op itself refuses to be differentiated.
    sample = (
        torch.rand(6),
        q.detach(),
        k.detach(),
        pos,
        scale.detach(),
        row_lse.detach(),
        col_lse.detach(),
        False,
        [True, True, True],
    )
    torch.library.opcheck(torch.ops.mgccl.contrastive_loss_backward.default, sample)


def test_torch_compile_fullgraph():
    q, k, pos, weight, scale = make_inputs(16, 12, 8, torch.float32)

    def loss_fn(q, k, scale):
        return mgccl_ops.contrastive_loss(q, k, pos, scale, weight=weight) * 2

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, scale)
    grads = torch.autograd.grad(loss, (q, k, scale))
    expected_loss = loss_fn(q, k, scale)
    expected_grads = torch.autograd.grad(expected_loss, (q, k, scale))
    assert_close(loss, expected_loss, torch.float32)
    for got, want in zip(grads, expected_grads):
        assert_close(got, want, torch.float32)


@pytest.mark.peak_memory
def test_peak_memory_does_not_grow_as_n_times_m():
    """At N = M = 16384 the logits alone would take 1 GiB; the op's extra memory stays far below."""
    params = {"provider": "mgccl", "n": 16384, "d": 4, "dtype": "float32", "device": "cpu", "symmetric": False}
    peak = harness.peak_memory_mib("mgccl_ops.bench.contrastive:loss_step", params, "cpu")
    assert peak is not None and peak < 1024 / 4, f"peak extra memory {peak} MiB"


BAD_INPUTS = [
    (lambda q, k, p: (q[0], k, p, 1.0), {}, "q should be a 2-D tensor"),
    (lambda q, k, p: (q, k[None], p, 1.0), {}, "k should be a 2-D tensor"),
    (lambda q, k, p: (q, k[:, :2], p, 1.0), {}, "k.shape[1] should equal"),
    (lambda q, k, p: (q, k, p[:3], 1.0), {}, "pos.shape[0] should equal"),
    (lambda q, k, p: (q, k, p.int(), 1.0), {}, "pos should be int64"),
    (lambda q, k, p: (q, k.double(), p, 1.0), {}, "k has dtype torch.float64 but q has dtype torch.float32"),
    (lambda q, k, p: (q.int(), k.int(), p, 1.0), {}, "q should be float16, bfloat16, float32 or float64"),
    (lambda q, k, p: (q, k, p, float("inf")), {}, "scale should be finite"),
    (lambda q, k, p: (q, k, p, torch.tensor([1.0, 2.0])), {}, "scale should be a float or a 0-dim tensor"),
    (lambda q, k, p: (q, k, p, 1.0), {"reduction": "avg"}, "reduction should be one of"),
    (lambda q, k, p: (q, k, p, 1.0), {"weight": torch.ones(2)}, "weight.shape[0] should equal"),
    (lambda q, k, p: (q, k, p, 1.0), {"symmetric": True}, "symmetric=True needs as many queries as keys"),
]


@pytest.mark.parametrize("make_args,kwargs,message", BAD_INPUTS)
def test_bad_input_raises_clear_value_error(make_args, kwargs, message):
    q, k, pos, _, _ = make_inputs(5, 4, 3, torch.float32)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        mgccl_ops.contrastive_loss(*make_args(q, k, pos), **kwargs)


@pytest.mark.parametrize(
    "pos,symmetric,message",
    [
        (torch.tensor([0, 1, 4, 2]), False, r"pos values should lie in \[-1, 4\), got min 0 and max 4"),
        (torch.tensor([0, -2, 1, 2]), False, r"pos values should lie in \[-1, 4\), got min -2 and max 2"),
        (torch.tensor([0, 1, 1, 2]), True, "pos to be a permutation"),
        (torch.tensor([0, 1, -1, 2]), True, r"pos values should lie in \[0, 4\)"),
    ],
)
def test_bad_pos_values_raise(pos, symmetric, message):
    q, k, _, _, _ = make_inputs(4, 4, 3, torch.float32)
    with pytest.raises(RuntimeError, match=message):
        mgccl_ops.contrastive_loss(q, k, pos, 1.0, symmetric=symmetric)


def test_nan_scale_tensor_raises():
    q, k, pos, _, _ = make_inputs(4, 4, 3, torch.float32)
    with pytest.raises(RuntimeError, match="scale should be finite, got nan"):
        mgccl_ops.contrastive_loss(q, k, pos, torch.tensor(float("nan")))
