"""The mining options of topk_hard_negatives (exclude_self, max_sim, margin, skip) against the
reference, on every device path the op has."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_topk_hard_negatives import assert_same_selection, make_inputs

import mgccl_ops
from mgccl_ops import reference
from mgccl_ops.reference.mining import allowed_keys

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def both(q, k, num, **kwargs):
    """(ours, reference) of one mining call."""
    return mgccl_ops.topk_hard_negatives(q, k, num, **kwargs), reference.topk_hard_negatives(q, k, num, **kwargs)


def assert_equal_selection(ours, ref):
    assert torch.equal(ours[0], ref[0]), f"idx differ:\n{ours[0]}\n{ref[0]}"
    assert torch.equal(ours[1], ref[1]), f"sim differ:\n{ours[1]}\n{ref[1]}"


def test_exclude_self_never_returns_the_row_itself():
    """The issue's case: queries and keys the same set; without the option every row's own key
    is its hardest negative."""
    x = torch.nn.functional.normalize(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    plain = mgccl_ops.topk_hard_negatives(x, x, 5)[0]
    assert (plain[:, 0] == torch.arange(64)).all()
    idx, sim = mgccl_ops.topk_hard_negatives(x, x, 4, exclude_self=True)
    assert not (idx == torch.arange(64)[:, None]).any()
    assert torch.equal(idx, plain[:, 1:])
    assert_same_selection(idx, sim, *reference.topk_hard_negatives(x, x, 4, exclude_self=True), atol=1e-5)


def test_max_sim_drops_near_duplicates():
    q, k, pos, _, _ = make_inputs(40, 60, 6, torch.float32, integer=True)
    (idx, sim), ref = both(q, k, 10, pos=pos, max_sim=1.0)
    assert_equal_selection((idx, sim), ref)
    assert (sim[idx >= 0] <= 1.0).all()
    full = q @ k.T
    # Keys at or below the bound are kept: every row holds as many as are allowed.
    allowed = allowed_keys(40, 60, q.device, pos) & (full <= 1.0)
    assert ((idx >= 0).sum(1) == allowed.sum(1).clamp_max(10)).all()


def test_margin_drops_keys_close_to_the_positive():
    q, k, pos, _, _ = make_inputs(50, 40, 5, torch.float32, integer=True)
    pos[::7] = -1
    (idx, sim), ref = both(q, k, 8, pos=pos, margin=1.0)
    assert_equal_selection((idx, sim), ref)
    pos_sim = (q * k[pos.clamp_min(0)]).sum(1)
    for i in range(50):
        chosen = sim[i][idx[i] >= 0]
        if pos[i] >= 0:
            assert (chosen <= pos_sim[i] - 1.0).all(), f"row {i}"
    # Rows without a positive get no margin filter.
    plain = mgccl_ops.topk_hard_negatives(q, k, 8, pos=pos)
    assert torch.equal(idx[pos < 0], plain[0][pos < 0])


def test_negative_margin_allows_keys_above_the_positive():
    q, k, pos, _, _ = make_inputs(30, 30, 4, torch.float64)
    assert_equal_selection(*both(q, k, 6, pos=pos, margin=-0.5))


@pytest.mark.parametrize("skip", [0, 1, 5, 29, 30, 1000])
def test_skip_drops_the_most_similar(skip):
    q, k, pos, q_group, k_group = make_inputs(25, 30, 5, torch.float32, integer=True)
    (idx, sim), ref = both(q, k, 7, pos=pos, q_group=q_group, k_group=k_group, skip=skip)
    assert_equal_selection((idx, sim), ref)
    longer = mgccl_ops.topk_hard_negatives(q, k, 30, pos=pos, q_group=q_group, k_group=k_group)
    expected = torch.cat([longer[0], torch.full((25, skip + 7), -1)], dim=1)[:, skip : skip + 7]
    assert torch.equal(idx, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_options_together_match_reference(dtype):
    q, k, pos, q_group, k_group = make_inputs(120, 120, 24, dtype, groups=10, seed=4)
    kwargs = dict(pos=pos, q_group=q_group, k_group=k_group, exclude_self=True, max_sim=4.0, margin=0.5, skip=2)
    ours, ref = both(q, k, 9, **kwargs)
    assert_same_selection(*ours, *ref, atol=1e-4 if dtype != torch.float64 else 1e-9)


def test_options_span_several_key_blocks_and_row_tiles():
    q, k, pos, q_group, k_group = make_inputs(700, 700, 4, torch.float32, groups=30, seed=5, integer=True)
    kwargs = dict(pos=pos, q_group=q_group, k_group=k_group, exclude_self=True, max_sim=2.0, margin=0.0, skip=3)
    assert_equal_selection(*both(q, k, 12, **kwargs))


def test_minus_inf_similarities_are_returned_nan_never():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    k = torch.tensor([[float("-inf"), 0.0], [1.0, 0.0], [float("nan"), 0.0], [2.0, 0.0]])
    # Row 0: s = (-inf, 1, nan, 2); row 1: s = (nan, 0, nan, 0); row 2: s = (-inf, 1, nan, 2).
    (idx, sim), ref = both(q, k, 4)
    assert_equal_selection((idx, sim), ref)
    assert idx[0].tolist() == [3, 1, 0, -1] and sim[0, 2] == float("-inf")
    assert idx[1].tolist() == [1, 3, -1, -1]


def test_margin_with_nan_positive_similarity_filters_nothing():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[float("nan"), 0.0], [1.0, 0.0], [3.0, 0.0]])
    (idx, _), ref = both(q, k, 3, pos=torch.tensor([0]), margin=0.1)
    assert_equal_selection((idx, _), ref)
    assert idx[0].tolist() == [2, 1, -1]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"skip": -1}, ValueError, "skip should be >= 0, got -1"),
        ({"skip": 1.5}, TypeError, "skip should be an int, got float"),
        ({"exclude_self": True}, ValueError, "exclude_self=True needs as many queries as keys, got N = 9 and M = 11"),
        ({"margin": 0.1, "pos": None}, ValueError, "margin needs pos"),
        ({"margin": float("nan")}, ValueError, "margin should be a number, got nan"),
        ({"max_sim": float("nan")}, ValueError, "max_sim should be a number, got nan"),
        ({"max_sim": "high"}, TypeError, "max_sim should be a float or None, got str"),
    ],
)
def test_bad_options(kwargs, error, match):
    q, k, pos, _, _ = make_inputs(9, 11, 5, torch.float32)
    with pytest.raises(error, match=match):
        mgccl_ops.topk_hard_negatives(q, k, 3, **({"pos": pos} | kwargs))


def test_options_under_compile():
    q, k, pos, _, _ = make_inputs(12, 12, 5, torch.float32)

    def mine(q, k, pos):
        return mgccl_ops.topk_hard_negatives(q, k, 3, pos=pos, exclude_self=True, max_sim=2.0, margin=0.1, skip=1)

    compiled = torch.compile(mine, fullgraph=True, backend="eager")
    assert_equal_selection(compiled(q, k, pos), mine(q, k, pos))


@given(
    n=st.integers(0, 16),
    m=st.integers(1, 24),
    d=st.integers(1, 5),
    num_fraction=st.floats(0, 1),
    use_pos=st.booleans(),
    groups=st.sampled_from([0, 1, 3]),
    square=st.booleans(),
    max_sim=st.sampled_from([None, -1.0, 0.0, 2.0]),
    margin=st.sampled_from([None, -1.0, 0.0, 1.0]),
    skip=st.integers(0, 30),
    seed=st.integers(0, 2**16),
)
def test_options_properties(n, m, d, num_fraction, use_pos, groups, square, max_sim, margin, skip, seed):
    """Integer inputs make every similarity exact, so the kernels must equal the reference."""
    if square:
        m = max(n, 1) if n > 0 else m
        n = m
    q, k, pos, q_group, k_group = make_inputs(n, m, d, torch.float32, max(groups, 1), seed, integer=True)
    num = round(num_fraction * m)
    kwargs = {"pos": pos if use_pos or margin is not None else None, "max_sim": max_sim, "margin": margin}
    kwargs.update(exclude_self=square, skip=skip)
    if groups:
        kwargs.update(q_group=q_group, k_group=k_group)
    assert_equal_selection(*both(q, k, num, **kwargs))
