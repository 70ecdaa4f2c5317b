"""topk_hard_negatives (DESIGN.md op 2) against the reference, faiss and its defining properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mgccl_ops
from mgccl_ops import reference
from mgccl_ops.reference.mining import allowed_keys

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def make_inputs(n, m, d, dtype, groups=4, seed=0, integer=False):
    """Random queries/keys (small integers when ``integer``, so ties are exact), positives
    (some -1) and groups."""
    g = torch.Generator().manual_seed(seed)
    if integer:
        q = torch.randint(-1, 2, (n, d), generator=g).to(dtype)
        k = torch.randint(-1, 2, (m, d), generator=g).to(dtype)
    else:
        q = torch.randn(n, d, generator=g).to(dtype)
        k = torch.randn(m, d, generator=g).to(dtype)
    pos = torch.randint(-1, max(m, 1), (n,), generator=g) if m > 0 else torch.full((n,), -1)
    q_group = torch.randint(0, groups, (n,), generator=g)
    k_group = torch.randint(0, groups, (m,), generator=g)
    return q, k, pos, q_group, k_group


def exact_similarity(q, k):
    """[N, M] similarities in float64 (exact for small-integer inputs)."""
    return q.double() @ k.double().T


def assert_valid_selection(q, k, num, idx, sim, pos=None, q_group=None, k_group=None, atol=0.0):
    """The defining properties of a mining result, checked row by row.

    Returned keys are allowed and distinct, ``sim`` equals ``<q_i, k_idx>`` and is sorted
    descending (ties: smaller index first), padding fills exactly the tail beyond the allowed
    count, and no allowed key left out beats the last returned one (up to ``atol``).
    """
    n, m = q.shape[0], k.shape[0]
    assert idx.shape == (n, num) and idx.dtype == torch.int64
    assert sim.shape == (n, num) and sim.dtype == torch.float32
    allowed = allowed_keys(n, m, q.device, pos, q_group, k_group)
    full = exact_similarity(q, k)
    for i in range(n):
        expected_count = min(num, int(allowed[i].sum()))
        row_idx, row_sim = idx[i], sim[i]
        assert (row_idx[expected_count:] == -1).all(), f"row {i}: padding {row_idx}"
        assert torch.isneginf(row_sim[expected_count:]).all(), f"row {i}: padding {row_sim}"
        chosen = row_idx[:expected_count]
        assert (chosen >= 0).all() and allowed[i, chosen].all(), f"row {i}: {chosen} not allowed"
        assert len(set(chosen.tolist())) == expected_count, f"row {i}: repeated keys {chosen}"
        true_sim = full[i, chosen]
        torch.testing.assert_close(row_sim[:expected_count].double(), true_sim, atol=atol + 1e-5, rtol=1e-5)
        for a in range(expected_count - 1):
            s0, s1 = row_sim[a].item(), row_sim[a + 1].item()
            assert s0 > s1 or (s0 == s1 and chosen[a] < chosen[a + 1]) or abs(s0 - s1) <= atol, (
                f"row {i}: not sorted at {a}: {row_sim[:expected_count]} {chosen}"
            )
        if 0 < expected_count:
            left_out = allowed[i].clone()
            left_out[chosen] = False
            if left_out.any():
                last = true_sim[-1].item()
                best_left = full[i][left_out].max().item()
                assert best_left <= last + atol, f"row {i}: left out {best_left} > last {last}"


def assert_same_selection(idx, sim, ref_idx, ref_sim, atol):
    """Equal similarities at every rank; equal keys wherever the rank is not a near-tie."""
    torch.testing.assert_close(sim, ref_sim, atol=atol, rtol=0)
    assert torch.equal(idx == -1, ref_idx == -1)
    padded = torch.cat([ref_sim, torch.full_like(ref_sim[:, :1], float("-inf"))], dim=1)
    gap_after = padded[:, :-1] - padded[:, 1:]
    gap_before = torch.cat([torch.full_like(ref_sim[:, :1], float("inf")), gap_after[:, :-1]], 1)
    clear = (gap_after > 2 * atol) & (gap_before > 2 * atol)
    mismatched = clear & (idx != ref_idx)
    assert not mismatched.any(), (
        f"{int(mismatched.sum())} clear ranks differ, first at {mismatched.nonzero()[:5].tolist()}"
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num", [0, 1, 7, 123])
def test_matches_reference(dtype, num):
    q, k, pos, q_group, k_group = make_inputs(47, 123, 31, dtype)
    ours = mgccl_ops.topk_hard_negatives(q, k, num, pos=pos, q_group=q_group, k_group=k_group)
    ref = reference.topk_hard_negatives(q, k, num, pos=pos, q_group=q_group, k_group=k_group)
    assert_same_selection(*ours, *ref, atol=1e-4)


@pytest.mark.parametrize("num", [1, 5, 40])
def test_exact_ties_match_reference(num):
    q, k, pos, q_group, k_group = make_inputs(60, 40, 5, torch.float32, integer=True)
    ours = mgccl_ops.topk_hard_negatives(q, k, num, pos=pos, q_group=q_group, k_group=k_group)
    ref = reference.topk_hard_negatives(q, k, num, pos=pos, q_group=q_group, k_group=k_group)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])


def test_spans_several_key_blocks_and_row_tiles():
    q, k, pos, q_group, k_group = make_inputs(600, 1500, 16, torch.float32, groups=50, seed=3)
    idx, sim = mgccl_ops.topk_hard_negatives(q, k, 20, pos=pos, q_group=q_group, k_group=k_group)
    ref = reference.topk_hard_negatives(q, k, 20, pos=pos, q_group=q_group, k_group=k_group)
    assert_same_selection(idx, sim, *ref, atol=1e-4)


def test_options_are_independent():
    q, k, pos, q_group, k_group = make_inputs(30, 25, 8, torch.float64)
    for kwargs in ({}, {"pos": pos}, {"q_group": q_group, "k_group": k_group}):
        ours = mgccl_ops.topk_hard_negatives(q, k, 6, **kwargs)
        assert_valid_selection(q, k, 6, *ours, **kwargs, atol=1e-9)
        assert torch.equal(ours[0], reference.topk_hard_negatives(q, k, 6, **kwargs)[0])


def test_rows_with_every_key_excluded_are_padding():
    q, k, pos, _, _ = make_inputs(6, 4, 3, torch.float32)
    k_group = torch.tensor([0, 0, 1, 1])
    q_group = torch.tensor([0, 1, 2, 0, 1, 2])
    pos = torch.tensor([2, 0, -1, 3, 3, 1])
    idx, sim = mgccl_ops.topk_hard_negatives(q, k, 4, pos=pos, q_group=q_group, k_group=k_group)
    assert_valid_selection(q, k, 4, idx, sim, pos, q_group, k_group)
    assert (idx >= 0).sum(1).tolist() == [1, 1, 4, 1, 2, 3]
    all_excluded = mgccl_ops.topk_hard_negatives(
        q,
        k,
        4,
        q_group=torch.zeros(6, dtype=torch.long),
        k_group=torch.zeros(4, dtype=torch.long),
    )
    assert (all_excluded[0] == -1).all() and torch.isneginf(all_excluded[1]).all()


def test_empty_inputs():
    q = torch.randn(0, 8)
    k = torch.randn(5, 8)
    idx, sim = mgccl_ops.topk_hard_negatives(q, k, 3)
    assert idx.shape == (0, 3) and sim.shape == (0, 3)
    idx, sim = mgccl_ops.topk_hard_negatives(torch.randn(4, 8), torch.randn(0, 8), 0)
    assert idx.shape == (4, 0) and sim.shape == (4, 0)


def test_nan_similarities_are_never_selected():
    q, k, pos, _, _ = make_inputs(8, 30, 4, torch.float32)
    q[2] = float("nan")
    k[5] = float("nan")
    idx, sim = mgccl_ops.topk_hard_negatives(q, k, 29, pos=pos)
    assert (idx[2] == -1).all() and torch.isneginf(sim[2]).all()
    assert not (idx == 5).any() and not sim.isnan().any()
    for i in (0, 1, 3, 4, 5, 6, 7):
        unusable = {5} | ({int(pos[i])} if pos[i] >= 0 else set())
        assert int((idx[i] >= 0).sum()) == min(29, 30 - len(unusable)), f"row {i}"


def test_no_gradient():
    q = torch.randn(10, 4, requires_grad=True)
    k = torch.randn(9, 4, requires_grad=True)
    idx, sim = mgccl_ops.topk_hard_negatives(q, k, 3)
    assert not sim.requires_grad and not idx.requires_grad


@pytest.mark.parametrize("num", [1, 16])
def test_matches_faiss_over_allowed_keys(num):
    """faiss searches all keys; asking for num + (most keys any row excludes) candidates and
    dropping the excluded ones gives the top num allowed keys of every row."""
    faiss = pytest.importorskip("faiss")
    q, k, pos, q_group, k_group = make_inputs(300, 500, 32, torch.float32, groups=40, seed=7)
    allowed = allowed_keys(300, 500, q.device, pos, q_group, k_group)
    extra = int((~allowed).sum(1).max())
    index = faiss.IndexFlatIP(32)
    index.add(k.numpy())
    cand_sim, cand_idx = index.search(q.numpy(), num + extra)
    cand_sim, cand_idx = torch.from_numpy(cand_sim), torch.from_numpy(cand_idx)
    keep = allowed.gather(1, cand_idx)
    order = torch.sort(keep.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :num]
    faiss_idx, faiss_sim = cand_idx.gather(1, order), cand_sim.gather(1, order)
    idx, sim = mgccl_ops.topk_hard_negatives(q, k, num, pos=pos, q_group=q_group, k_group=k_group)
    assert_same_selection(idx, sim, faiss_idx, faiss_sim, atol=1e-4)


@given(
    n=st.integers(0, 20),
    m=st.integers(1, 30),
    d=st.integers(1, 6),
    num_fraction=st.floats(0, 1),
    use_pos=st.booleans(),
    groups=st.sampled_from([0, 1, 3, 8]),
    seed=st.integers(0, 2**16),
)
def test_properties(n, m, d, num_fraction, use_pos, groups, seed):
    q, k, pos, q_group, k_group = make_inputs(n, m, d, torch.float32, max(groups, 1), seed, integer=True)
    num = round(num_fraction * m)
    kwargs = {"pos": pos if use_pos else None}
    if groups:
        kwargs.update(q_group=q_group, k_group=k_group)
    idx, sim = mgccl_ops.topk_hard_negatives(q, k, num, **kwargs)
    assert_valid_selection(q, k, num, idx, sim, **kwargs)
    ref = reference.topk_hard_negatives(q, k, num, **kwargs)
    assert torch.equal(idx, ref[0]) and torch.equal(sim, ref[1])


def test_opcheck():
    q, k, pos, q_group, k_group = make_inputs(9, 11, 5, torch.float32)
    square = torch.randn(11, 5)
    for args in [
        (q, k, 4, pos, q_group, k_group, False, None, None, 0),
        (q, k, 0, None, None, None, False, None, None, 0),
        (q, k, 11, pos, None, None, False, None, None, 0),
        (q, k, 3, pos, q_group, k_group, False, 0.5, 0.1, 2),
        (square, k, 4, None, None, None, True, None, None, 1),
    ]:
        torch.library.opcheck(torch.ops.mgccl.topk_hard_negatives.default, args)


def test_compile_fullgraph():
    q, k, pos, q_group, k_group = make_inputs(9, 11, 5, torch.float32)

    def mine(q, k, pos, q_group, k_group):
        return mgccl_ops.topk_hard_negatives(q, k, 3, pos=pos, q_group=q_group, k_group=k_group)

    compiled = torch.compile(mine, fullgraph=True, backend="eager")
    for a, b in zip(compiled(q, k, pos, q_group, k_group), mine(q, k, pos, q_group, k_group)):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"num": 12}, ValueError, r"num should lie in \[0, M = 11\], got 12"),
        ({"num": -1}, ValueError, r"num should lie in \[0, M = 11\], got -1"),
        (
            {"q_group": torch.zeros(8, dtype=torch.long)},
            ValueError,
            r"q_group.shape\[0\] should equal N = 9",
        ),
        (
            {"k_group": torch.zeros(12, dtype=torch.long)},
            ValueError,
            r"k_group.shape\[0\] should equal M = 11",
        ),
        (
            {"k_group": None},
            ValueError,
            "q_group and k_group should be given together, got only q_group",
        ),
        (
            {"pos": torch.zeros(9, dtype=torch.int32)},
            ValueError,
            "pos should be int64, got torch.int32",
        ),
        (
            {"k": torch.randn(11, 4)},
            ValueError,
            r"k.shape\[1\] should equal q.shape\[1\] \(D\) = 5",
        ),
        (
            {"k": torch.randn(11, 5, dtype=torch.float64)},
            ValueError,
            "k has dtype torch.float64 but q",
        ),
        (
            {"pos": torch.full((9,), 11)},
            RuntimeError,
            r"pos values should lie in \[-1, 11\), got min 11",
        ),
        (
            {"pos": torch.full((9,), -2)},
            RuntimeError,
            r"pos values should lie in \[-1, 11\), got min -2",
        ),
    ],
)
def test_bad_input(change, error, match):
    q, k, pos, q_group, k_group = make_inputs(9, 11, 5, torch.float32)
    args = {
        "q": q,
        "k": k,
        "num": 3,
        "pos": pos,
        "q_group": q_group,
        "k_group": k_group,
    } | change
    num = args.pop("num")
    with pytest.raises(error, match=match):
        mgccl_ops.topk_hard_negatives(args.pop("q"), args.pop("k"), num, **args)


def test_kernel_checks_without_wrapper():
    q, k, pos, q_group, k_group = make_inputs(9, 11, 5, torch.float32)
    with pytest.raises(RuntimeError, match=r"num should lie in \[0, M = 11\], got 20"):
        torch.ops.mgccl.topk_hard_negatives.default(q, k, 20, pos, q_group, k_group, False, None, None, 0)
    with pytest.raises(RuntimeError, match=r"k_group.shape\[0\] should equal k.shape\[0\] = 11"):
        torch.ops.mgccl.topk_hard_negatives.default(q, k, 2, pos, q_group, k_group[:3], False, None, None, 0)
    with pytest.raises(RuntimeError, match="skip should be >= 0, got -2"):
        torch.ops.mgccl.topk_hard_negatives.default(q, k, 2, pos, None, None, False, None, None, -2)
    with pytest.raises(RuntimeError, match="exclude_self=True needs as many queries as keys, got N = 9 and M = 11"):
        torch.ops.mgccl.topk_hard_negatives.default(q, k, 2, pos, None, None, True, None, None, 0)
    with pytest.raises(RuntimeError, match="margin needs pos"):
        torch.ops.mgccl.topk_hard_negatives.default(q, k, 2, None, None, None, False, None, 0.1, 0)
