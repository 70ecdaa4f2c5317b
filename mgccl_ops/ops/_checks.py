"""Argument checks on tensor metadata, shared by the typed op wrappers.

They run before dispatch and on fake tensors alike, so they look only at shapes, dtypes and
devices; checks on values (index ranges) run inside the kernels. Each message names the op,
the argument and what was received.
"""

from __future__ import annotations

import torch

from mgccl_ops.ops._dtypes import FLOAT_DTYPES, accumulation_dtype
from mgccl_ops.ops._reductions import check_reduction
from mgccl_ops.ops.autocast import dtypes_unified_by_autocast


def check_tensor(op: str, name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} should be a torch.Tensor, got {type(value).__name__}")
    return value


def check_dim(op: str, name: str, tensor: torch.Tensor, dim: int, layout: str) -> None:
    """``layout`` names the axes, e.g. "[N, D]"."""
    check_tensor(op, name, tensor)
    if tensor.dim() != dim:
        raise ValueError(
            f"{op}: {name} should be a {dim}-D tensor {layout}, got {tensor.dim()}-D with shape {tuple(tensor.shape)}"
        )


def check_size(op: str, name: str, tensor: torch.Tensor, axis: int, expected: int, what: str) -> None:
    if tensor.shape[axis] != expected:
        raise ValueError(
            f"{op}: {name}.shape[{axis}] should equal {what} = {expected}, got shape {tuple(tensor.shape)}"
        )


def check_float(op: str, name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} should be float16, bfloat16, float32 or float64, got {tensor.dtype}")


def check_same_dtype(op: str, name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Equal dtypes, or two that autocast (on for ``ref``'s device) casts to its one dtype."""
    if tensor.dtype != ref.dtype and not dtypes_unified_by_autocast(ref, tensor):
        raise ValueError(
            f"{op}: {name} has dtype {tensor.dtype} but {ref_name} has dtype {ref.dtype}; "
            "all inputs of one call must share a dtype"
        )


def check_index(op: str, name: str, tensor: torch.Tensor, length: int, what: str) -> None:
    """A 1-D int64 index tensor of the given length."""
    check_dim(op, name, tensor, 1, f"[{what}]")
    if tensor.dtype != torch.int64:
        raise ValueError(f"{op}: {name} should be int64, got {tensor.dtype}")
    check_size(op, name, tensor, 0, length, what)


def check_same_device(op: str, name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``tensor`` (argument ``name``) is on the device of ``ref`` (argument ``ref_name``)."""
    if tensor.device != ref.device:
        raise ValueError(f"{op}: {name} is on {tensor.device} but {ref_name} is on {ref.device}")


def check_choice(op: str, name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name} should be one of {choices}, got {value!r}")


def scale_tensor(op: str, scale: float | torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``scale`` as a 0-dim tensor on ``ref``'s device (float64 for float64 inputs, else float32).

    A tensor is passed through unchanged (so its gradient flows) after checking it is 0-dim.
    Its finiteness is checked inside the kernels.
    """
    if isinstance(scale, torch.Tensor):
        if scale.dim() != 0:
            raise ValueError(f"{op}: scale should be a float or a 0-dim tensor, got shape {tuple(scale.shape)}")
        if not scale.is_floating_point():
            raise ValueError(f"{op}: scale should be a floating tensor, got {scale.dtype}")
        return scale
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"{op}: scale should be a float or a 0-dim tensor, got {type(scale).__name__}")
    if scale != scale or scale in (float("inf"), float("-inf")):
        raise ValueError(f"{op}: scale should be finite, got {scale}")
    return torch.tensor(float(scale), dtype=accumulation_dtype(ref.dtype), device=ref.device)


def check_query_key_pair(op: str, q: torch.Tensor, k: torch.Tensor) -> None:
    """q [N, D] and k [M, D]: floating, one dtype, one device, one width D."""
    check_dim(op, "q", q, 2, "[N, D]")
    check_dim(op, "k", k, 2, "[M, D]")
    check_float(op, "q", q)
    check_same_dtype(op, "k", k, "q", q)
    check_size(op, "k", k, 1, q.shape[1], "q.shape[1] (D)")
    check_same_device(op, "k", k, "q", q)


def check_loss_inputs(op: str, q, k, pos, scale, weight, reduction) -> None:
    """The arguments every loss op shares: q [N, D], k [M, D], pos [N] int64, a 0-dim scale,
    optional floating weight [N] and the reduction name, all on q's device."""
    check_query_key_pair(op, q, k)
    check_index(op, "pos", pos, q.shape[0], "N")
    check_same_device(op, "pos", pos, "q", q)
    check_same_device(op, "scale", scale, "q", q)
    if weight is not None:
        check_dim(op, "weight", weight, 1, "[N]")
        check_size(op, "weight", weight, 0, q.shape[0], "q.shape[0] (N)")
        if not weight.is_floating_point():
            raise ValueError(f"{op}: weight should be a floating tensor, got {weight.dtype}")
        check_same_device(op, "weight", weight, "q", q)
    check_reduction(op, reduction)


def fake_gradients(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, grad_mask) -> tuple:
    """Fake-impl outputs for (grad_q [N, D], grad_k [M, D], grad_scale []); [0] where not requested."""
    return (
        q.new_empty(q.shape if grad_mask[0] else (0,)),
        k.new_empty(k.shape if grad_mask[1] else (0,)),
        scale.new_empty(() if grad_mask[2] else (0,)),
    )
