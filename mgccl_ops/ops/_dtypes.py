"""Dtype rules shared by the op wrappers, fake impls and references.

Inputs may be float16, bfloat16, float32 or float64; accumulation, log-sum-exps and
reductions run in float32, or float64 for float64 inputs.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums over inputs of ``dtype`` are taken in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
