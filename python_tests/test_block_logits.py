"""The ring's block computations (mgccl_ops.distributed.block_logits) against autograd on the
materialised logits, with tiles forced small so that a block spans several of them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mgccl_ops.distributed import block_logits


@pytest.fixture
def tiny_tiles(monkeypatch):
    """Tiles of 3 rows whatever the block's width."""
    monkeypatch.setattr(block_logits, "MIN_TILE_ROWS", 3)
    monkeypatch.setattr(block_logits, "tile_bytes", lambda device: 1)


def _reference(q, k, scale, row_coef, col_coef):
    """Log-sum-exps of the materialised logits and the gradients of
    ``row_coef * sum(row lse) + col_coef * sum(col lse)`` by autograd (float64)."""
    q64, k64, s64 = (t.detach().double().requires_grad_() for t in (q, k, scale))
    logits = s64 * q64 @ k64.T
    rows, cols = torch.logsumexp(logits, 1), torch.logsumexp(logits, 0)
    (row_coef * rows.sum() + col_coef * cols.sum()).backward()
    return rows, cols, q64.grad, k64.grad, s64.grad


@pytest.mark.usefixtures("tiny_tiles")
@given(
    n=st.integers(1, 11),
    m=st.integers(1, 9),
    d=st.integers(1, 5),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_log_sum_exps_and_gradients_equal_autograd_on_the_logits(n, m, d, symmetric, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randn(m, d, generator=gen, dtype=torch.float64)
    scale = torch.tensor(3.5, dtype=torch.float64)
    row_coef, col_coef = torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.3 if symmetric else 0.0)
    rows, cols, grad_q, grad_k, grad_s = _reference(q, k, scale, row_coef, col_coef)

    got_rows, got_cols = block_logits.block_log_sum_exps(q, k, scale, want_columns=symmetric)
    torch.testing.assert_close(got_rows, rows.detach())
    assert (got_cols is None) == (not symmetric)
    if symmetric:
        torch.testing.assert_close(got_cols, cols.detach())

    to_q, to_k, to_s = block_logits.block_gradients(
        q, k, scale, rows.detach(), row_coef, cols.detach() if symmetric else None, col_coef if symmetric else None
    )
    torch.testing.assert_close(scale * to_q, grad_q)
    torch.testing.assert_close(scale * to_k, grad_k)
    torch.testing.assert_close(to_s, grad_s)


@pytest.mark.usefixtures("tiny_tiles")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 10, 4, generator=gen)
    scale = torch.tensor(2.0)
    rows, cols, *_ = _reference(q.to(dtype), k.to(dtype), scale, 1.0, 1.0)
    got_rows, got_cols = block_logits.block_log_sum_exps(q.to(dtype), k.to(dtype), scale, want_columns=True)
    assert got_rows.dtype == got_cols.dtype == torch.float32
    torch.testing.assert_close(got_rows.double(), rows.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_cols.double(), cols.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("n", "m"), [(0, 4), (4, 0), (0, 0)])
def test_an_empty_side_gives_minus_infinity_and_zero_gradients(n, m):
    q, k, scale = torch.randn(n, 3), torch.randn(m, 3), torch.tensor(2.0)
    rows, cols = block_logits.block_log_sum_exps(q, k, scale, want_columns=True)
    assert rows.shape == (n,) and cols.shape == (m,)
    assert bool((rows == float("-inf")).all()) and bool((cols == float("-inf")).all())
    to_q, to_k, to_s = block_logits.block_gradients(q, k, scale, rows, torch.tensor(1.0), cols, torch.tensor(1.0))
    assert to_q.shape == (n, 3) and to_k.shape == (m, 3)
    assert not to_q.any() and not to_k.any() and to_s.item() == 0.0


def test_tiles_hold_at_least_the_minimum_rows_and_at_most_the_budget():
    budget, acc = block_logits.tile_bytes(torch.device("cpu")), torch.float32
    narrow = [rows.shape[0] for _, rows in block_logits._tiles(torch.zeros(5000, 2), 64, acc)]
    assert narrow[0] * 64 * 4 <= budget and sum(narrow) == 5000
    wide = [rows.shape[0] for _, rows in block_logits._tiles(torch.zeros(300, 2), 10**6, acc)]
    assert wide == [block_logits.MIN_TILE_ROWS, block_logits.MIN_TILE_ROWS, 300 - 2 * block_logits.MIN_TILE_ROWS]
