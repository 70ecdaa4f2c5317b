"""hard_negative_loss (DESIGN.md op 3) against the reference: values, gradients, edge cases."""

from __future__ import annotations

import pytest
import torch
from compare import assert_close

import mgccl_ops
from mgccl_ops import reference

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def make_inputs(n, m, d, num_neg, dtype, seed=0):
    """Normalised queries/keys, positives with some -1, negatives with padding and duplicates."""
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1).to(dtype)
    pos = torch.randint(0, m, (n,), generator=g)
    pos[::5] = -1
    neg_idx = torch.randint(0, m, (n, num_neg), generator=g)
    if num_neg >= 2:
        neg_idx[::3, 1] = neg_idx[::3, 0]  # duplicates
    if num_neg >= 3:
        neg_idx[::4, -1] = -1  # padding
    neg_idx[1::7] = -1  # rows with only padding
    weight = torch.rand(n, generator=g) + 0.5
    return q, k, pos, neg_idx, weight


def loss_and_grads(fn, q, k, pos, neg_idx, scale, weight, reduction):
    q = q.clone().requires_grad_()
    k = k.clone().requires_grad_()
    scale = scale.clone().requires_grad_()
    loss = fn(q, k, pos, neg_idx, scale, weight=weight, reduction=reduction)
    upstream = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape).to(loss.dtype)
    grads = torch.autograd.grad((loss * upstream).sum(), [q, k, scale])
    return loss, grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("use_weight", [False, True])
def test_matches_reference(dtype, reduction, use_weight):
    q, k, pos, neg_idx, weight = make_inputs(47, 23, 31, 6, dtype)
    weight = weight if use_weight else None
    scale = torch.tensor(7.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    ours, our_grads = loss_and_grads(mgccl_ops.hard_negative_loss, q, k, pos, neg_idx, scale, weight, reduction)
    ref, ref_grads = loss_and_grads(reference.hard_negative_loss, q, k, pos, neg_idx, scale, weight, reduction)
    assert ours.dtype == ref.dtype
    assert_close(ours, ref, dtype, "loss")
    for name, a, b in zip(["grad_q", "grad_k", "grad_scale"], our_grads, ref_grads):
        assert a.dtype == b.dtype, name
        assert_close(a, b, dtype, name)


def test_float_scale_and_no_grad_inputs():
    q, k, pos, neg_idx, _ = make_inputs(20, 9, 8, 4, torch.float32)
    q.requires_grad_()
    loss = mgccl_ops.hard_negative_loss(q, k, pos, neg_idx, 3.5)
    ref = reference.hard_negative_loss(q, k, pos, neg_idx, 3.5)
    assert_close(loss, ref, torch.float32)
    (grad,) = torch.autograd.grad(loss, [q])
    (ref_grad,) = torch.autograd.grad(ref, [q])
    assert_close(grad, ref_grad, torch.float32, "grad_q")
    with torch.no_grad():
        assert_close(mgccl_ops.hard_negative_loss(q, k, pos, neg_idx, 3.5), ref, torch.float32)


def test_gradcheck():
    q, k, pos, neg_idx, weight = make_inputs(12, 7, 5, 4, torch.float64, seed=1)
    q.requires_grad_()
    k.requires_grad_()
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    for reduction in ["mean", "none"]:

        def fn(q, k, scale, reduction=reduction):
            return mgccl_ops.hard_negative_loss(q, k, pos, neg_idx, scale, weight=weight, reduction=reduction)

        assert torch.autograd.gradcheck(fn, (q, k, scale))


def test_duplicates_count_and_accumulate_deterministically():
    """A negative listed twice is two softmax terms, and both push gradient into its key."""
    q, k, pos, _, _ = make_inputs(64, 3, 16, 1, torch.float32, seed=2)
    pos = torch.zeros(64, dtype=torch.long)
    twice = torch.tensor([[1, 1, 2]]).expand(64, 3).contiguous()
    listed = reference.hard_negative_loss(q, k, pos, twice, 4.0)
    assert_close(mgccl_ops.hard_negative_loss(q, k, pos, twice, 4.0), listed, torch.float32)
    once = mgccl_ops.hard_negative_loss(q, k, pos, twice[:, 1:], 4.0)
    assert (listed - once).abs() > 1e-3
    results = []
    for _ in range(3):
        k_leaf = k.clone().requires_grad_()
        loss = mgccl_ops.hard_negative_loss(q, k_leaf, pos, twice, 4.0, reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), [k_leaf])
        results.append(grad)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_negative_equal_to_positive_counts_as_a_term():
    q, k, pos, _, _ = make_inputs(6, 4, 8, 1, torch.float64)
    pos = torch.tensor([0, 1, 2, 3, 0, 1])
    neg_idx = torch.stack([pos, (pos + 1) % 4], dim=1)
    assert_close(
        mgccl_ops.hard_negative_loss(q, k, pos, neg_idx, 2.0, reduction="none"),
        reference.hard_negative_loss(q, k, pos, neg_idx, 2.0, reduction="none"),
        torch.float64,
    )


def test_ignored_and_padding_only_rows():
    q, k, pos, neg_idx, _ = make_inputs(10, 5, 4, 3, torch.float32)
    pos[:] = -1
    q.requires_grad_()
    loss = mgccl_ops.hard_negative_loss(q, k, pos, neg_idx, 2.0)
    (grad,) = torch.autograd.grad(loss, [q])
    assert loss.item() == 0.0 and (grad == 0).all()
    pos[:] = 2
    neg_idx[:] = -1
    rows = mgccl_ops.hard_negative_loss(q, k, pos, neg_idx, 2.0, reduction="none")
    assert (rows == 0).all()


@pytest.mark.parametrize("n, m, num_neg", [(0, 4, 3), (5, 0, 2), (6, 4, 0)])
def test_empty_inputs(n, m, num_neg):
    q = torch.randn(n, 8, requires_grad=True)
    k = torch.randn(m, 8, requires_grad=True)
    pos = torch.full((n,), -1 if m == 0 else 1)
    neg_idx = torch.full((n, num_neg), -1)
    loss = mgccl_ops.hard_negative_loss(q, k, pos, neg_idx, 3.0)
    gq, gk = torch.autograd.grad(loss, [q, k])
    assert loss.item() == 0.0 and not gq.any() and not gk.any()


def opcheck_samples():
    q, k, pos, neg_idx, weight = make_inputs(9, 6, 5, 3, torch.float32)
    scale = torch.tensor(3.0, requires_grad=True)
    q.requires_grad_()
    k.requires_grad_()
    for reduction, w, mask in [
        ("mean", None, [True, True, True]),
        ("sum", weight, [True, False, True]),
        ("none", weight, [True, True, True]),
    ]:
        yield (q, k, pos, neg_idx, scale, w, reduction, mask)


@pytest.mark.parametrize("args", list(opcheck_samples()))
def test_opcheck(args):
    torch.library.opcheck(torch.ops.mgccl.hard_negative_loss.default, args)


def test_opcheck_backward():
    q, k, pos, neg_idx, _ = make_inputs(9, 6, 5, 3, torch.float32)
    row_grad = torch.rand(9)
    for mask in ([True, True, True], [False, True, False]):
        args = (row_grad, q, k, pos, neg_idx, torch.tensor(3.0), mask)
        torch.library.opcheck(torch.ops.mgccl.hard_negative_loss_backward.default, args)


def test_compile_fullgraph():
    """The compiled forward (aot_eager: autograd through the registered backward) matches eager."""
    q, k, pos, neg_idx, weight = make_inputs(9, 6, 5, 3, torch.float32)
    q.requires_grad_()
    k.requires_grad_()
    scale = torch.tensor(3.0, requires_grad=True)

    def loss_fn(q, k, scale):
        return mgccl_ops.hard_negative_loss(q, k, pos, neg_idx, scale, weight=weight)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    eager_loss = loss_fn(q, k, scale)
    eager_grads = torch.autograd.grad(eager_loss, [q, k, scale])
    compiled_loss = compiled(q, k, scale)
    compiled_grads = torch.autograd.grad(compiled_loss, [q, k, scale])
    assert_close(compiled_loss, eager_loss, torch.float32, "loss")
    for name, a, b in zip(["grad_q", "grad_k", "grad_scale"], compiled_grads, eager_grads):
        assert_close(a, b, torch.float32, name)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (
            {"neg_idx": torch.full((9, 3), 6)},
            RuntimeError,
            r"neg_idx values should lie in \[-1, 6\), got min 6",
        ),
        (
            {"neg_idx": torch.full((9, 3), -3)},
            RuntimeError,
            r"neg_idx values should lie in \[-1, 6\), got min -3",
        ),
        (
            {"neg_idx": torch.zeros(8, 3, dtype=torch.long)},
            ValueError,
            r"neg_idx.shape\[0\] should equal",
        ),
        (
            {"neg_idx": torch.zeros(9, dtype=torch.long)},
            ValueError,
            r"neg_idx should be a 2-D tensor \[N, K\]",
        ),
        (
            {"neg_idx": torch.zeros(9, 3, dtype=torch.int32)},
            ValueError,
            "neg_idx should be int64",
        ),
        (
            {"pos": torch.full((9,), 6)},
            RuntimeError,
            r"pos values should lie in \[-1, 6\)",
        ),
        (
            {"k": torch.randn(6, 5, dtype=torch.float64)},
            ValueError,
            "k has dtype torch.float64",
        ),
        ({"weight": torch.ones(4)}, ValueError, r"weight.shape\[0\] should equal"),
        ({"reduction": "max"}, ValueError, "reduction should be one of"),
        ({"scale": float("nan")}, ValueError, "scale should be finite"),
    ],
)
def test_bad_input(change, error, match):
    q, k, pos, neg_idx, _ = make_inputs(9, 6, 5, 3, torch.float32)
    args = {"q": q, "k": k, "pos": pos, "neg_idx": neg_idx, "scale": 2.0} | change
    kwargs = {name: args.pop(name) for name in ("weight", "reduction") if name in args}
    with pytest.raises(error, match=match):
        mgccl_ops.hard_negative_loss(*args.values(), **kwargs)
