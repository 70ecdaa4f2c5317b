"""Bitonic sort, top-k and merge of int64 tensors along the last axis, for packed (score, index) keys.

The same networks as ``tl.sort`` / ``tl.topk`` / ``tl.bitonic_merge`` (the tensor is viewed as a
hypercube ``[2] * log2(numel)``; a compare-and-swap step pairs the two elements of one axis), but
the partner of each element is found as ``sum(pair) - self`` instead of ``xor_sum(pair) ^ self``.
For integers the two are the same exact arithmetic (the sum wraps and the subtraction unwraps
it); on the GPU both are one shuffle per step, while Triton's interpreter runs ``tl.sum`` as one
NumPy call but ``xor_sum`` (a custom combine function) element by element in Python, which made a
mining call take seconds. Integers only: for floats ``sum - self`` would round.

Sizes along the last axis and the total number of elements must be powers of two.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.jit import constexpr_function


@constexpr_function
def _log2(n):
    return int(n).bit_length() - 1


@triton.jit
def _merge_steps(h, stage: tl.constexpr, order: tl.constexpr):
    """``stage`` compare-and-swap steps on hypercube ``h`` that sort bitonic runs of 2**stage
    elements; order 0 ascending, 1 descending, 2 alternating between neighbouring runs (to build
    longer bitonic runs). Written as one function: under the interpreter every nested jit call
    costs more than the step itself."""
    n_dims: tl.constexpr = _log2(h.numel)
    if order == 2:  # noqa: SIM108  (a tensor or a constexpr)
        flip = tl.reshape(tl.arange(0, 2), [1] * (n_dims - stage - 1) + [2] + [1] * stage)
    else:
        flip = order
    for step in tl.static_range(stage):
        # Pairs along hypercube axis n_dims - stage + step (the (stage - 1 - step)-th innermost).
        partner = tl.sum(h, axis=n_dims - stage + step, keep_dims=True) - h
        is_second = tl.reshape(tl.arange(0, 2), [1] * (n_dims - stage + step) + [2] + [1] * (stage - 1 - step))
        h = tl.where((h > partner) != (flip ^ is_second), partner, h)
    return h


@triton.jit
def packed_topk(x, k: tl.constexpr):
    """The ``k`` largest of ``x`` [..., n] along the last axis, sorted descending: [..., k]."""
    log_n: tl.constexpr = _log2(x.shape[len(x.shape) - 1])
    log_k: tl.constexpr = _log2(k)
    h = tl.reshape(x, [2] * _log2(x.numel))
    for stage in tl.static_range(1, log_k + 1):
        h = _merge_steps(h, stage, 2 if stage < log_n else 1)
    # Halve the candidates: the larger of two opposite sorted runs holds the top k of both.
    for stage in tl.static_range(log_k + 1, log_n + 1):
        h = tl.max(h, axis=_log2(h.numel) - 1 - log_k)
        h = _merge_steps(h, log_k, 2 if stage < log_n else 1)
    return tl.reshape(h, x.shape[: len(x.shape) - 1] + [k])


@triton.jit
def packed_bitonic_merge_ascending(x):
    """Sorts ascending a tensor whose rows (last axis) are bitonic sequences."""
    h = tl.reshape(x, [2] * _log2(x.numel))
    h = _merge_steps(h, _log2(x.shape[len(x.shape) - 1]), 0)
    return tl.reshape(h, x.shape)
