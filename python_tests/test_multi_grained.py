"""multi_grained_loss (DESIGN.md op 4) against the reference: full softmax and hard negatives."""

from __future__ import annotations

import pytest
import torch
from compare import assert_close

import mgccl_ops
from mgccl_ops import reference

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def make_inputs(sizes, m, d, dtype, groups=5, seed=0, with_groups=True):
    """Levels of normalised queries (some rows ignored, one level optionally without groups),
    a key bank and key groups."""
    g = torch.Generator().manual_seed(seed)
    k = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1).to(dtype)
    k_group = torch.randint(0, groups, (m,), generator=g)
    levels = []
    for index, n in enumerate(sizes):
        q = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype)
        pos = torch.randint(0, m, (n,), generator=g)
        pos[index::4] = -1
        weight = 1.0 / (index + 1)
        if with_groups and index != 1:
            levels.append((q, pos, weight, k_group[pos.clamp_min(0)]))
        else:
            levels.append((q, pos, weight))
    return levels, k, k_group


def run(fn, levels, k, scale, **kwargs):
    """Total, per-level losses and the gradients of the total for every q, k and scale."""
    levels = [(level[0].clone().requires_grad_(), *level[1:]) for level in levels]
    k = k.clone().requires_grad_()
    scale = scale.clone().requires_grad_()
    total, per_level = fn(levels, k, scale, **kwargs)
    grads = torch.autograd.grad(total, [level[0] for level in levels] + [k, scale])
    return total, per_level, grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hard_negatives", [None, 0, 3, 100])
def test_matches_reference(dtype, hard_negatives):
    levels, k, k_group = make_inputs([13, 40, 7], 29, 16, dtype)
    scale = torch.tensor(9.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    kwargs = {"k_group": k_group, "hard_negatives": hard_negatives}
    total, per_level, grads = run(mgccl_ops.multi_grained_loss, levels, k, scale, **kwargs)
    ref_total, ref_per_level, ref_grads = run(reference.multi_grained_loss, levels, k, scale, **kwargs)
    assert total.shape == () and per_level.shape == (3,)
    assert not per_level.requires_grad
    assert_close(total, ref_total, dtype, "total")
    assert_close(per_level, ref_per_level, dtype, "per_level")
    for name, a, b in zip(["q0", "q1", "q2", "k", "scale"], grads, ref_grads):
        assert a.dtype == b.dtype, name
        assert_close(a, b, dtype, f"grad {name}")


def test_total_is_weighted_sum_of_level_means():
    levels, k, _ = make_inputs([10, 20], 15, 8, torch.float64, with_groups=False)
    total, per_level = mgccl_ops.multi_grained_loss(levels, k, 5.0)
    singles = [mgccl_ops.contrastive_loss(q, k, pos, 5.0) for q, pos, _ in levels]
    assert_close(per_level, torch.stack(singles), torch.float64, "per_level")
    assert_close(total, singles[0] * 1.0 + singles[1] * 0.5, torch.float64, "total")


def test_groups_steer_the_mining():
    """With every key in the rows' own group nothing is left to mine: each row loss is 0."""
    levels, k, _ = make_inputs([6, 5], 8, 4, torch.float32, with_groups=False)
    k_group = torch.zeros(8, dtype=torch.long)
    grouped = [(q, pos, w, torch.zeros(q.shape[0], dtype=torch.long)) for q, pos, w in levels]
    total, per_level = mgccl_ops.multi_grained_loss(grouped, k, 4.0, k_group=k_group, hard_negatives=3)
    assert total.item() == 0.0 and (per_level == 0).all()
    total, _ = mgccl_ops.multi_grained_loss(levels, k, 4.0, k_group=k_group, hard_negatives=3)
    assert total.item() > 0


def test_level_without_valid_rows_and_empty_level():
    levels, k, k_group = make_inputs([6, 5, 4], 8, 4, torch.float32)
    q1, pos1, w1 = levels[1]
    levels[1] = (q1, torch.full_like(pos1, -1), w1)
    levels[2] = (levels[2][0][:0], levels[2][1][:0], 3.0, levels[2][3][:0])
    for hard_negatives in (None, 2):
        total, per_level, grads = run(
            mgccl_ops.multi_grained_loss,
            levels,
            k,
            torch.tensor(2.0),
            k_group=k_group,
            hard_negatives=hard_negatives,
        )
        assert per_level[1] == 0 and per_level[2] == 0
        assert not grads[1].any() and grads[2].shape == (0, 4)
        ref = reference.multi_grained_loss(levels, k, 2.0, k_group=k_group, hard_negatives=hard_negatives)
        assert_close(total, ref[0], torch.float32)


def test_compile_fullgraph():
    levels, k, k_group = make_inputs([5, 7], 9, 4, torch.float32)
    qs = [level[0].requires_grad_() for level in levels]
    scale = torch.tensor(3.0, requires_grad=True)

    def loss_fn(q0, q1, scale, hard_negatives):
        rebuilt = [(q0, *levels[0][1:]), (q1, *levels[1][1:])]
        return mgccl_ops.multi_grained_loss(rebuilt, k, scale, k_group=k_group, hard_negatives=hard_negatives)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    for hard_negatives in (None, 3):
        eager_total, eager_per_level = loss_fn(*qs, scale, hard_negatives)
        eager_grads = torch.autograd.grad(eager_total, [*qs, scale])
        total, per_level = compiled(*qs, scale, hard_negatives)
        grads = torch.autograd.grad(total, [*qs, scale])
        assert_close(total, eager_total, torch.float32, "total")
        assert_close(per_level, eager_per_level, torch.float32, "per_level")
        for a, b in zip(grads, eager_grads):
            assert_close(a, b, torch.float32, "grad")


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (
            lambda lv, kw: lv.clear(),
            ValueError,
            "levels should be a non-empty sequence",
        ),
        (
            lambda lv, kw: lv.__setitem__(0, lv[0][:2]),
            ValueError,
            r"levels\[0\] should be \(q, pos, weight\)",
        ),
        (
            lambda lv, kw: kw.update(k_group=None),
            ValueError,
            r"levels\[0\] has a q_group but k_group is None",
        ),
        (
            lambda lv, kw: kw.update(hard_negatives=-1),
            ValueError,
            "hard_negatives should be None or an int >= 0",
        ),
        (
            lambda lv, kw: lv.__setitem__(1, (lv[1][0].double(), lv[1][1], 1.0)),
            ValueError,
            r"levels\[1\] q has dtype torch.float64 but k has dtype torch.float32",
        ),
        (
            lambda lv, kw: lv.__setitem__(1, (lv[1][0], lv[1][1][:3], 1.0)),
            ValueError,
            r"levels\[1\] pos.shape\[0\] should equal N_l = 5",
        ),
        (
            lambda lv, kw: lv.__setitem__(0, (*lv[0][:3], lv[0][3][:2])),
            ValueError,
            r"levels\[0\] q_group.shape\[0\] should equal N_l = 6",
        ),
        (
            lambda lv, kw: kw.update(k_group=torch.zeros(3, dtype=torch.long)),
            ValueError,
            r"k_group.shape\[0\] should equal M = 8",
        ),
        (
            lambda lv, kw: lv.__setitem__(1, (lv[1][0], torch.full((5,), 8), 1.0)),
            ValueError,
            r"levels\[1\] pos values should lie in \[-1, M = 8\)",
        ),
        (
            lambda lv, kw: lv.__setitem__(1, (*lv[1][:2], "heavy")),
            TypeError,
            r"levels\[1\] weight should be a float",
        ),
    ],
)
def test_bad_input(mutate, error, match):
    levels, k, k_group = make_inputs([6, 5], 8, 4, torch.float32)
    kwargs = {"k_group": k_group, "hard_negatives": 2}
    mutate(levels, kwargs)
    with pytest.raises(error, match=match):
        mgccl_ops.multi_grained_loss(levels, k, 2.0, **kwargs)
