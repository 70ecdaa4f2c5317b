"""How every ``mgccl::`` operator behaves under ``torch.autocast`` (CPU and CUDA).

Without a rule of its own, an operator defined in C++ falls through the autocast dispatch key
and its kernel then runs with autocast still switched on: the ``at::`` calls inside the kernel
(matrix products, scatters) are autocast one by one and come back in mixed dtypes
("scatter(): Expected self.dtype to be equal to src.dtype"). Each operator therefore gets an
autocast kernel for the ``AutocastCPU`` and ``AutocastCUDA`` keys that casts the arguments of
its rule and calls the operator with autocast off (the same mechanism as
``torch.library.register_autocast``, which would cast every floating argument; here the casts
are per argument, so a logit scale or per-row weights keep their precision).

The rules (also in docs/ops.md, "Autocast"):

- ``to autocast dtype``: the similarity family (``contrastive_loss``, ``topk_hard_negatives``,
  ``hard_negative_loss``, and ``multi_grained_loss`` through them): ``q`` and ``k`` are cast to
  the autocast dtype (bf16 or fp16), as autocast casts the operands of ``torch.mm``; the kernels
  multiply in that dtype and accumulate, take log-sum-exps and reduce in float32, so the loss is
  float32 as before. ``scale`` and ``weight`` are not cast. As with autocast's own casts, only
  float32/float16/bfloat16 tensors are cast; float64 inputs run in float64.
- ``input dtype``: the backward operators (their inputs already are what the forward used) and
  the region operators (``region_merge``, ``region_auto_threshold``, ``region_pool``,
  ``region_sum``, ``region_broadcast``): no cast. They compare, pool and sum in float32
  (float64 for float64) whatever the input dtype, and return the input dtype.

Any other ``mgccl::`` operator (one registered later by another module) gets the
``input dtype`` rule, so its kernel never runs with autocast on. :func:`register` is called at
import by ``mgccl_ops/__init__.py``, after every operator is defined.
"""

from __future__ import annotations

import torch

NAMESPACE = "mgccl"
DEVICE_TYPES = ("cpu", "cuda")
AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
CASTABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Operator -> the names of the arguments cast to the autocast dtype (empty: none cast).
CAST_TO_AUTOCAST_DTYPE = {
    "contrastive_loss": ("q", "k"),
    "topk_hard_negatives": ("q", "k"),
    "hard_negative_loss": ("q", "k"),
    "sigmoid_contrastive_loss": ("q", "k"),
}

_registered: dict[str, torch.library.Library] = {}


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type`` now, or None when autocast is off there."""
    if device_type not in AUTOCAST_KEYS or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` in ``dtype`` if it is float32/float16/bfloat16 and dtype is given, else as is."""
    if dtype is None or not isinstance(tensor, torch.Tensor) or tensor.dtype not in CASTABLE_DTYPES:
        return tensor
    return tensor.to(dtype)


def cast_for_autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors as the similarity ops' autocast rule casts them (on the first one's device).

    For Python code that combines the ops' inputs itself (``multi_grained_loss``), so that its
    own arithmetic sees the same values as the kernels.
    """
    dtype = autocast_dtype(tensors[0].device.type)
    return tuple(cast(t, dtype) for t in tensors)


def dtypes_unified_by_autocast(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when autocast is on for ``a``'s device and will cast ``a`` and ``b`` to one dtype.

    The wrappers' same-dtype check accepts such a pair (say bf16 features from an autocast
    matmul against a float32 key bank): the autocast kernel casts both before the kernel runs.
    """
    return autocast_dtype(a.device.type) is not None and a.dtype in CASTABLE_DTYPES and b.dtype in CASTABLE_DTYPES


def _autocast_kernel(op: torch._ops.OpOverload, device_type: str, cast_names: tuple[str, ...]):
    key = getattr(torch._C.DispatchKey, AUTOCAST_KEYS[device_type])
    names = [a.name for a in op._schema.arguments]
    # (A listed name missing from the schema is caught by python_tests/test_autocast.py, not here:
    # a failure at import would take the whole package down.)
    positions = {names.index(name) for name in cast_names if name in names}

    def kernel(*args, **kwargs):
        dtype = torch.get_autocast_dtype(device_type)
        args = tuple(cast(a, dtype) if i in positions else a for i, a in enumerate(args))
        kwargs = {name: cast(a, dtype) if name in cast_names else a for name, a in kwargs.items()}
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*args, **kwargs)

    return kernel


def namespace_ops() -> list[str]:
    """The names (without namespace) of every operator defined under ``mgccl::`` now."""
    prefix = f"{NAMESPACE}::"
    return sorted(name[len(prefix) :] for name in torch._C._dispatch_get_all_op_names() if name.startswith(prefix))


def cast_argument_names(name: str) -> tuple[str, ...]:
    """The arguments of operator ``name`` that autocast casts (empty: input dtype rule)."""
    return CAST_TO_AUTOCAST_DTYPE.get(name, ())


def register() -> None:
    """Registers the autocast kernel of every ``mgccl::`` operator not yet given one."""
    for name in namespace_ops():
        if name in _registered:
            continue
        op = getattr(torch.ops.mgccl, name).default
        lib = torch.library.Library(NAMESPACE, "IMPL")
        for device_type, key in AUTOCAST_KEYS.items():
            kernel = _autocast_kernel(op, device_type, cast_argument_names(name))
            lib.impl(name, kernel, key)
            # The same rule for the Python dispatcher, which torch.compile traces through.
            dispatch_key = getattr(torch._C.DispatchKey, key)
            op.py_kernels.pop(dispatch_key, None)
            op.py_impl(dispatch_key)(kernel)
        _registered[name] = lib
