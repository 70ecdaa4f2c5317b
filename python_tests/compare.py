"""Tensor comparison for tests: per-dtype tolerances and a report of where values differ."""

from __future__ import annotations

import torch

# (atol, rtol) by the dtype of the op's inputs.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 5e-4),
    torch.float16: (2e-3, 2e-2),
    torch.bfloat16: (5e-3, 5e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "value") -> None:
    """Asserts ``actual`` matches ``expected`` within the tolerance for ``dtype``.

    On failure, reports how many elements differ, the largest difference and the first indices.
    """
    atol, rtol = TOLERANCES[dtype]
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol, equal_nan=True)
    if bad.any():
        where = bad.nonzero()[:5].tolist()
        diff = (actual - expected).abs()[bad].max().item()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements differ (atol={atol}, rtol={rtol}); "
            f"max abs diff {diff:.3g}; first at {where}: "
            f"actual {[actual[tuple(i)].item() for i in where]}, expected {[expected[tuple(i)].item() for i in where]}"
        )
