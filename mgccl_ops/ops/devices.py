"""Which devices each ``mgccl::`` operator has a kernel for, and a clear error for the others.

Every operator gets a catch-all kernel under the ``CompositeExplicitAutograd`` alias key: the
dispatcher runs it for any backend without a kernel of its own (CPU, CUDA and Meta have
theirs), so an op called on, say, an MPS or XPU tensor, or on CUDA in a build without CUDA
kernels, raises a ``NotImplementedError`` that names the operator, the device and the devices
it does support, instead of the dispatcher's "Could not run ... with arguments from the ...
backend". :func:`register` runs at import (``mgccl_ops/__init__.py``) after every operator and
kernel is registered; :func:`device_table` reads the same registrations for the README table.
"""

from __future__ import annotations

import re

import torch

NAMESPACE = "mgccl"
CATCH_ALL_KEY = "CompositeExplicitAutograd"
TABLE_DEVICES = ("cpu", "cuda")
_BACKEND_KEYS = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}

_registered: dict[str, torch.library.Library] = {}


def namespace_ops() -> list[str]:
    """The names (without namespace) of every operator defined under ``mgccl::`` now."""
    prefix = f"{NAMESPACE}::"
    return sorted(name[len(prefix) :] for name in torch._C._dispatch_get_all_op_names() if name.startswith(prefix))


def kernel_origin(op_name: str, device_type: str) -> str | None:
    """Where the kernel of ``mgccl::op_name`` for ``device_type`` (cpu, cuda, meta) comes from.

    Returns "C++" (a ``.cpp`` registration), "CUDA C++" (a ``.cu`` registration), "Python"
    (a Python kernel: the Triton kernels of ``mgccl_ops.triton`` on cuda, or on cpu with
    ``MGCCL_TRITON_ON_CPU=1``; the fake impl on meta), or None when there is no kernel of the
    device's own (the catch-all error then answers).
    """
    key = _BACKEND_KEYS[device_type]
    dump = torch._C._dispatch_dump(f"{NAMESPACE}::{op_name}")
    match = re.search(rf"^{key}: registered at (\S+?):\d+", dump, flags=re.MULTILINE)
    if match is None:
        return None
    source = match.group(1)
    if source.endswith(".cu"):
        return "CUDA C++"
    if source.endswith((".cpp", ".cc", ".h")):
        return "C++"
    return "Python"


def supported_devices(op_name: str) -> list[str]:
    """The device types (cpu, cuda, meta) that ``mgccl::op_name`` has a kernel for."""
    return [device for device in _BACKEND_KEYS if kernel_origin(op_name, device) is not None]


def device_of_keyset(keyset: torch._C.DispatchKeySet) -> str:
    """The device type of the backend the dispatcher was dispatching to (e.g. "cuda", "mps")."""
    key = keyset.highestPriorityTypeId()
    name = str(key).rsplit(".", 1)[-1]
    match = re.fullmatch(r"(SparseCsr|Sparse|Quantized|Nested)?(\w+)", name)
    layout, backend = match.group(1), match.group(2)
    device = torch._C._get_privateuse1_backend_name() if backend == "PrivateUse1" else backend.lower()
    return f"{device} ({layout.lower()} layout)" if layout else device


def unsupported_device_message(op_name: str, device: str) -> str:
    supported = ", ".join(d for d in supported_devices(op_name) if d != "meta") or "none"
    return (
        f"mgccl_ops: {op_name} has no kernel for device '{device}' in this build "
        f"(kernels: {supported}; meta tensors are supported for shape inference). "
        "Move the inputs to a supported device; README.md lists the kernels per device."
    )


def _catch_all(op_name: str):
    def kernel(keyset, *args, **kwargs):
        raise NotImplementedError(unsupported_device_message(op_name, device_of_keyset(keyset)))

    return kernel


def register() -> None:
    """Registers the catch-all error kernel of every ``mgccl::`` operator not yet given one."""
    for name in namespace_ops():
        if name in _registered:
            continue
        lib = torch.library.Library(NAMESPACE, "IMPL")
        lib.impl(name, _catch_all(name), CATCH_ALL_KEY, with_keyset=True)
        _registered[name] = lib


def device_table(op_names: list[str] | None = None) -> dict[str, dict[str, str | None]]:
    """``{op: {"cpu": origin, "cuda": origin}}`` for the given operators (default: all).

    Origins as :func:`kernel_origin` reads them from the dispatcher of this process; the
    README's device table is this table for a CUDA build with Triton installed.
    """
    names = namespace_ops() if op_names is None else op_names
    return {name: {device: kernel_origin(name, device) for device in TABLE_DEVICES} for name in names}
