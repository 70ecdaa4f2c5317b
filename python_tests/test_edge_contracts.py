"""The edge-case contracts of docs/ops.md ("Edge cases"): empty inputs, negative / NaN / ignored
weights, infinite level weights, -inf similarities, non-finite features, double backward and
error messages. Each is checked on the fused op against its reference (the spec)."""

from __future__ import annotations

import warnings

import pytest
import torch
from compare import assert_close

import mgccl_ops
from mgccl_ops import reference

NAN = float("nan")
INF = float("inf")


def loss_and_grads(fn, q, k, pos, scale, **kwargs):
    """(loss, grad_q, grad_k, grad_scale) of fn on fresh leaves; upstream ones for "none"."""
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_()
    scale = scale.detach().clone().requires_grad_()
    loss = fn(q, k, pos, scale, **kwargs)
    grads = torch.autograd.grad(loss, (q, k, scale), torch.ones_like(loss), allow_unused=True)
    return (loss, *grads)


def contrastive(q, k, pos, scale, impl, **kwargs):
    return impl.contrastive_loss(q, k, pos, scale, **kwargs)


def hard_negative(q, k, pos, scale, impl, **kwargs):
    neg_idx = torch.tensor([[1, 2, -1], [0, -1, 2], [3, 1, 0], [2, 0, 1]])[: q.shape[0]]
    return impl.hard_negative_loss(q, k, pos, neg_idx, scale, **kwargs)


LOSSES = {"contrastive_loss": contrastive, "hard_negative_loss": hard_negative}


def loss_inputs(dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(4, 5, generator=generator, dtype=dtype)
    k = torch.randn(4, 5, generator=generator, dtype=dtype)
    pos = torch.tensor([0, -1, 3, 1])
    scale = torch.tensor(1.3, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return q, k, pos, scale


def check_against_reference(name, weight, reduction, dtype=torch.float64):
    q, k, pos, scale = loss_inputs(dtype)
    fn = LOSSES[name]
    kwargs = {"weight": weight, "reduction": reduction}
    fused = loss_and_grads(lambda *a, **kw: fn(*a, mgccl_ops, **kw), q, k, pos, scale, **kwargs)
    ref = loss_and_grads(lambda *a, **kw: fn(*a, reference, **kw), q, k, pos, scale, **kwargs)
    for part, actual, expected in zip(["loss", "grad_q", "grad_k", "grad_scale"], fused, ref):
        assert_close(actual, expected, dtype, part)
    return fused


# --- weights ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSSES)
def test_negative_weights_divide_by_their_signed_sum(name):
    weight = torch.tensor([-1.0, 5.0, 0.25, -2.0], dtype=torch.float64)  # W = -1 + 0.25 - 2 = -2.75
    loss, *_ = check_against_reference(name, weight, "mean")
    total = check_against_reference(name, weight, "sum")[0]
    assert_close(loss, total / -2.75, torch.float64, "mean = sum / W")


@pytest.mark.parametrize("name", LOSSES)
def test_weights_summing_to_exactly_zero_give_zero_and_zero_gradients(name):
    weight = torch.tensor([1.5, 7.0, -1.0, -0.5], dtype=torch.float64)  # row 1 is ignored
    loss, grad_q, grad_k, grad_scale = check_against_reference(name, weight, "mean")
    assert loss.item() == 0.0
    for grad in (grad_q, grad_k, grad_scale):
        assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("name", LOSSES)
def test_nan_weight_makes_the_mean_and_every_gradient_nan(name):
    weight = torch.tensor([1.0, 1.0, NAN, 1.0], dtype=torch.float64)
    loss, grad_q, grad_k, grad_scale = check_against_reference(name, weight, "mean")
    assert loss.isnan()
    # Every gradient is NaN, but for the rows of q that are ignored (pos = -1), which get 0.
    assert grad_q[[0, 2, 3]].isnan().all() and torch.count_nonzero(grad_q[1]) == 0
    assert grad_k.isnan().all() and grad_scale.isnan()


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_nan_weight_poisons_only_its_own_row_under_sum_and_none(name, reduction):
    weight = torch.tensor([1.0, 1.0, NAN, 1.0], dtype=torch.float64)
    loss, grad_q, _, _ = check_against_reference(name, weight, reduction)
    if reduction == "none":
        assert loss.isnan().tolist() == [False, False, True, False]
    assert grad_q.isnan().any(1).tolist() == [False, False, True, False]


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_the_weight_of_an_ignored_row_is_not_used(name, reduction, bad):
    weight = torch.tensor([1.0, bad, 0.5, 2.0], dtype=torch.float64)  # row 1 has pos = -1
    loss, grad_q, grad_k, grad_scale = check_against_reference(name, weight, reduction)
    for value in (loss, grad_q, grad_k, grad_scale):
        assert value.isfinite().all()
    finite = check_against_reference(name, torch.tensor([1.0, 0.0, 0.5, 2.0], dtype=torch.float64), reduction)
    names = ["loss", "grad_q", "grad_k", "grad_scale"]
    for part, actual, expected in zip(names, (loss, grad_q, grad_k, grad_scale), finite):
        assert_close(actual, expected, torch.float64, part)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("scale", [INF, -INF, NAN])
def test_non_finite_scale_is_refused_by_op_and_reference(name, scale):
    q, k, pos, _ = loss_inputs()
    fn = LOSSES[name]
    for impl in (mgccl_ops, reference):
        for value in (scale, torch.tensor(scale, dtype=torch.float64)):
            with pytest.raises((ValueError, RuntimeError), match=f"{name}: scale should be finite"):
                fn(q, k, pos, value, impl)


# --- multi_grained_loss -------------------------------------------------------------------------


def multi_grained_case(weights, pos_per_level, hard_negatives=None):
    generator = torch.Generator().manual_seed(3)
    k = torch.randn(6, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    qs = [torch.randn(len(p), 4, generator=generator, dtype=torch.float64, requires_grad=True) for p in pos_per_level]
    levels = [(q, torch.tensor(p), w) for q, p, w in zip(qs, pos_per_level, weights)]
    results = []
    for impl in (mgccl_ops, reference):
        total, per_level = impl.multi_grained_loss(levels, k, 2.0, hard_negatives=hard_negatives)
        grads = torch.autograd.grad(total, [*qs, k], allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, [*qs, k])]
        results.append((total, per_level, grads))
    return results


@pytest.mark.parametrize("hard_negatives", [None, 2])
def test_infinite_level_weight_with_an_ignored_row(hard_negatives):
    (total, per_level, grads), (ref_total, ref_per_level, ref_grads) = multi_grained_case(
        [INF, 1.0], [[0, -1, 2], [1, 3]], hard_negatives
    )
    assert total.item() == INF and ref_total.item() == INF
    assert_close(per_level, ref_per_level, torch.float64, "per_level")
    assert per_level.isfinite().all()


@pytest.mark.parametrize("weight", [INF, NAN, -2.0])
def test_a_level_without_positives_contributes_nothing_whatever_its_weight(weight):
    (total, per_level, grads), (ref_total, ref_per_level, ref_grads) = multi_grained_case(
        [weight, 1.5], [[-1, -1], [1, 3, 0]]
    )
    assert total.isfinite() and ref_total.isfinite()
    assert_close(total, ref_total, torch.float64, "total")
    assert_close(per_level, ref_per_level, torch.float64, "per_level")
    assert per_level[0].item() == 0.0
    for index, (a, b) in enumerate(zip(grads, ref_grads)):
        assert_close(a, b, torch.float64, f"grad {index}")


def test_multi_grained_errors_name_the_level_and_the_op():
    k = torch.randn(5, 3)
    good = (torch.randn(2, 3), torch.tensor([0, 1]), 1.0)
    bad_pos = (torch.randn(2, 3), torch.tensor([0, 7]), 1.0)
    with pytest.raises(ValueError, match=r"multi_grained_loss: levels\[1\] pos values should lie in \[-1, M = 5\)"):
        mgccl_ops.multi_grained_loss([good, bad_pos], k, 1.0)
    with pytest.raises(ValueError, match=r"multi_grained_loss: levels\[1\] pos values"):
        mgccl_ops.multi_grained_loss([good, bad_pos], k, 1.0, hard_negatives=2)
    meta_q = (torch.randn(2, 3, device="meta"), torch.tensor([0, 1], device="meta"), 1.0)
    with pytest.raises(ValueError, match=r"multi_grained_loss: levels\[1\] q is on meta but k is on cpu"):
        mgccl_ops.multi_grained_loss([good, meta_q], k, 1.0)
    with pytest.raises(ValueError, match=r"multi_grained_loss: scale is on meta but k is on cpu"):
        mgccl_ops.multi_grained_loss([good], k, torch.tensor(1.0, device="meta"))
    with pytest.raises(RuntimeError, match=r"^multi_grained_loss: .*scale should be finite"):
        mgccl_ops.multi_grained_loss([good], k, torch.tensor(INF))


# --- topk_hard_negatives ------------------------------------------------------------------------


def test_minus_inf_similarities_are_allowed_and_nan_ones_never_selected():
    q = torch.tensor([[1.0], [-1.0], [0.0]])
    k = torch.tensor([[-INF], [2.0], [NAN], [-INF], [1.0]])
    for num in range(0, 6):
        idx, sim = mgccl_ops.topk_hard_negatives(q, k, num, pos=torch.tensor([4, -1, 0]))
        ref_idx, ref_sim = reference.topk_hard_negatives(q, k, num, pos=torch.tensor([4, -1, 0]))
        assert torch.equal(idx, ref_idx), (num, idx, ref_idx)
        assert torch.equal(sim, ref_sim), (num, sim, ref_sim)
    # Row 0 (pos 4): 1, then the two -inf keys 0 and 3; the NaN key 2 never.
    assert idx[0].tolist() == [1, 0, 3, -1, -1]
    assert sim[0].tolist() == [2.0, -INF, -INF, -INF, -INF]
    # Row 2: q = 0 gives 0 * -inf = NaN for keys 0 and 3, NaN for key 2; 0 for keys 1 and 4.
    assert idx[2].tolist() == [1, 4, -1, -1, -1]


def test_minus_inf_keys_fill_a_reservoir_that_overflows():
    """More -inf keys than the selection's reservoir (2 * num) holds: ties keep the smaller index."""
    q = torch.ones(2, 1)
    k = torch.full((40, 1), -INF)
    k[17] = 3.0
    idx, sim = mgccl_ops.topk_hard_negatives(q, k, 3)
    assert idx.tolist() == [[17, 0, 1]] * 2
    assert torch.equal((idx, sim)[1], reference.topk_hard_negatives(q, k, 3)[1])


# --- region ops ---------------------------------------------------------------------------------

EMPTY_IMAGES = [(1, 4, 3, 0), (2, 4, 0, 0), (1, 0, 5, 0), (0, 3, 2, 2), (2, 0, 3, 3), (1, 0, 1, 1), (3, 2, 1, 1)]


@pytest.mark.parametrize("shape", EMPTY_IMAGES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("connectivity", [4, 8])
def test_region_merge_on_empty_images_and_zero_channels(shape, dtype, connectivity):
    feat = torch.randn(shape, dtype=dtype)
    threshold = mgccl_ops.region_auto_threshold(feat, connectivity=connectivity)
    assert torch.equal(threshold, reference.region_auto_threshold(feat, connectivity=connectivity))
    for linkage in ("single", "average"):
        for thr in ("auto", 0.5):
            labels, num = mgccl_ops.region_merge(feat, thr, connectivity=connectivity, linkage=linkage)
            ref_labels, ref_num = reference.region_merge(feat, thr, connectivity=connectivity, linkage=linkage)
            assert torch.equal(labels, ref_labels) and torch.equal(num, ref_num)


@pytest.mark.parametrize("shape", EMPTY_IMAGES)
def test_region_pool_on_empty_images_and_zero_channels(shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    labels, num = reference.region_merge(x.detach(), 0.2)
    pooled = mgccl_ops.region_pool(x, labels, num)
    assert torch.equal(pooled, reference.region_pool(x, labels, num))
    back = mgccl_ops.region_broadcast(pooled, labels)
    assert torch.equal(back, reference.region_broadcast(pooled, labels))
    if pooled.numel() > 0:
        (grad,) = torch.autograd.grad(back.sum(), x)
        assert grad.shape == x.shape


@pytest.mark.parametrize("linkage", ["single", "average"])
@pytest.mark.parametrize("bad", [INF, -INF, NAN])
def test_a_non_finite_feature_leaves_the_automatic_threshold_finite(linkage, bad):
    feat = torch.randn(2, 8, 6, 7, generator=torch.Generator().manual_seed(1))
    feat[0, :, 2, 3] = bad
    feat[1, 3, 0, 0] = bad
    threshold = mgccl_ops.region_auto_threshold(feat)
    assert torch.equal(threshold, reference.region_auto_threshold(feat))
    assert threshold.isfinite().all()
    labels, num = mgccl_ops.region_merge(feat, "auto", linkage=linkage)
    ref_labels, ref_num = reference.region_merge(feat, "auto", linkage=linkage)
    assert torch.equal(num, ref_num) and torch.equal(labels, ref_labels)
    # The pixel with the non-finite feature is a region of its own.
    assert (labels[0] == labels[0, 2, 3]).sum() == 1


def test_region_messages_name_the_call_arguments():
    feat = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match="region_merge: threshold is on meta but feat is on cpu"):
        mgccl_ops.region_merge(feat, torch.tensor([0.5], device="meta"))
    labels = torch.zeros(1, 3, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="region_pool: num is on meta but x is on cpu"):
        mgccl_ops.region_pool(feat, labels, torch.tensor([1], device="meta"))
    with pytest.raises(ValueError, match="region_merge: threshold is on meta but feat is on cpu"):
        torch.ops.mgccl.region_merge(feat, torch.tensor([0.5], device="meta", dtype=torch.float64), 4, "single")


@pytest.mark.parametrize("num", [2**40, 2**62])
def test_region_pool_with_a_huge_num_names_the_op(num):
    x = torch.randn(1, 3, 2, 2)
    labels = torch.zeros(1, 2, 2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="^region_pool: "):
        mgccl_ops.region_pool(x, labels, torch.tensor([num]))


# --- second-order gradients ---------------------------------------------------------------------


def small_float64_inputs():
    q, k, pos, scale = loss_inputs(torch.float64)
    return q.requires_grad_(), k.requires_grad_(), pos, scale.requires_grad_()


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_double_backward_is_refused_with_a_clear_error(name, reduction, symmetric):
    if symmetric and name != "contrastive_loss":
        pytest.skip("symmetric is an option of contrastive_loss only")
    q, k, pos, scale = small_float64_inputs()
    kwargs = {"reduction": reduction, "weight": torch.rand(4, dtype=torch.float64)}
    if symmetric:
        pos = torch.tensor([2, 0, 3, 1])
        kwargs["symmetric"] = True

    def fn(q, k, scale):
        return LOSSES[name](q, k, pos, scale, mgccl_ops, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "autograd kernel was not registered" would fail here
        loss = fn(q, k, scale)
        with pytest.raises(RuntimeError, match=f"{name}: double backward is not supported by {name}"):
            torch.autograd.grad(loss.sum(), (q, k, scale), create_graph=True)
        with pytest.raises(RuntimeError, match="double backward is not supported"):
            torch.autograd.gradgradcheck(fn, (q, k, scale))
        # First-order gradients are unaffected.
        assert torch.autograd.gradcheck(fn, (q, k, scale))


def test_double_backward_through_multi_grained_loss_is_refused():
    k = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    q = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    for hard_negatives in (None, 2):
        levels = [(q, torch.tensor([0, 1, -1, 4]), 1.0)]
        total, _ = mgccl_ops.multi_grained_loss(levels, k, 1.0, hard_negatives=hard_negatives)
        with pytest.raises(RuntimeError, match="double backward is not supported"):
            torch.autograd.grad(total, (q, k), create_graph=True)


@pytest.mark.parametrize("backward_op", ["contrastive_loss_backward", "hard_negative_loss_backward"])
def test_internal_backward_ops_refuse_to_be_differentiated(backward_op):
    q, k, pos, scale = small_float64_inputs()
    row_grad = torch.ones(4, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if backward_op == "contrastive_loss_backward":
            row_lse = torch.logsumexp(scale.detach() * q.detach() @ k.detach().T, 1)
            grads = torch.ops.mgccl.contrastive_loss_backward(
                row_grad, q, k, pos, scale, row_lse, row_lse.new_empty(0), False, [True, True, True]
            )
        else:
            neg_idx = torch.tensor([[1, 2], [0, -1], [3, 1], [2, 0]])
            grads = torch.ops.mgccl.hard_negative_loss_backward(row_grad, q, k, pos, neg_idx, scale, [True, True, True])
        assert all(g.requires_grad for g in grads)
        with pytest.raises(RuntimeError, match="double backward is not supported"):
            torch.autograd.grad(grads[0].sum(), q)


def test_region_ops_have_true_second_order_gradients():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    labels, num = reference.region_merge(x.detach(), 0.3)
    torch.autograd.gradgradcheck(lambda x: mgccl_ops.region_pool(x, labels, num), (x,))
    regions = int(num.max())
    torch.autograd.gradgradcheck(lambda x: torch.ops.mgccl.region_sum(x, labels, regions), (x,))
    text = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(
        lambda x, t: mgccl_ops.adaptive_semantic_unit(x, t, threshold=0.3), (x, text), atol=1e-6
    )
