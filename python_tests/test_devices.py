"""Devices: an op on a device without a kernel names the op and the device; the README table
agrees with what the dispatcher has registered in this process.

No accelerator exists here, so the unsupported-device path is reached by dispatching an
operator to another backend's dispatch key (what a tensor on that device would do): the
dispatcher then runs the catch-all kernel of ``mgccl_ops/ops/devices.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import mgccl_ops
from mgccl_ops.ops import devices

README = Path(__file__).resolve().parents[1] / "README.md"


def sample_args(name: str) -> tuple:
    """Valid CPU arguments for every operator of the mgccl namespace."""
    q, k, pos, scale = torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, -1, 4]), torch.tensor(2.0)
    feat, labels = torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.int64)
    mask = [False, False, False]
    row_lse, col_lse = torch.zeros(4), torch.zeros(0)
    neg_idx = torch.tensor([[1, 2], [0, -1], [3, 4], [2, 1]])
    args = {
        "contrastive_loss": (q, k, pos, scale, None, "mean", False, mask),
        "contrastive_loss_backward": (torch.ones(4), q, k, pos, scale, row_lse, col_lse, False, mask),
        "topk_hard_negatives": (q, k, 2, pos, None, None),
        "hard_negative_loss": (q, k, pos, neg_idx, scale, None, "mean", mask),
        "hard_negative_loss_backward": (torch.ones(4), q, k, pos, neg_idx, scale, mask),
        "region_merge": (feat, torch.tensor([0.5], dtype=torch.float64), 4, "single"),
        "region_auto_threshold": (feat, 4),
        "region_pool": (feat, labels, torch.tensor([1])),
        "region_broadcast": (torch.randn(1, 1, 3), labels),
        "region_sum": (feat, labels, 1),
    }
    return args[name]


KNOWN_OPS = [
    "contrastive_loss",
    "contrastive_loss_backward",
    "topk_hard_negatives",
    "hard_negative_loss",
    "hard_negative_loss_backward",
    "region_merge",
    "region_auto_threshold",
    "region_pool",
    "region_broadcast",
    "region_sum",
]


def dispatch_to(key: str, name: str):
    op = getattr(torch.ops.mgccl, name).default
    keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
    return op.redispatch(keyset, *adapt_args(name))


def adapt_args(name: str) -> tuple:
    """``sample_args`` padded to the operator's current schema (trailing optional arguments
    added by other branches take their defaults)."""
    args = sample_args(name)
    schema_args = getattr(torch.ops.mgccl, name).default._schema.arguments
    extra = []
    for argument in schema_args[len(args) :]:
        if argument.has_default_value():
            extra.append(argument.default_value)
        elif str(argument.type).startswith("Optional"):
            extra.append(None)
        elif str(argument.type) == "bool":
            extra.append(False)
        elif str(argument.type) == "int":
            extra.append(0)
        else:
            pytest.skip(f"{name}: no sample value for the new argument {argument.name}: {argument.type}")
    return (*args, *extra)


@pytest.mark.parametrize("name", KNOWN_OPS)
@pytest.mark.parametrize(("key", "device"), [("XPU", "xpu"), ("MPS", "mps"), ("PrivateUse1", "privateuseone")])
def test_an_op_on_a_device_without_a_kernel_names_the_op_and_the_device(name, key, device):
    with pytest.raises(NotImplementedError) as info:
        dispatch_to(key, name)
    message = str(info.value)
    assert f"{name} has no kernel for device '{device}'" in message
    assert "kernels: cpu" in message
    assert "Could not run" not in message


@pytest.mark.parametrize("name", KNOWN_OPS)
def test_cuda_without_a_cuda_kernel_names_cuda(name):
    if devices.kernel_origin(name, "cuda") is not None:
        pytest.skip(f"{name} has a CUDA kernel in this build")
    with pytest.raises(NotImplementedError, match=rf"{name} has no kernel for device 'cuda'"):
        dispatch_to("CUDA", name)


@pytest.mark.parametrize("name", KNOWN_OPS)
def test_the_cpu_kernel_still_answers_on_cpu(name):
    getattr(torch.ops.mgccl, name).default(*adapt_args(name))


def test_public_wrappers_run_on_meta_tensors():
    q, k = torch.randn(6, 4, device="meta"), torch.randn(7, 4, device="meta")
    pos = torch.zeros(6, dtype=torch.int64, device="meta")
    assert mgccl_ops.contrastive_loss(q, k, pos, 3.0).device.type == "meta"
    idx, sim = mgccl_ops.topk_hard_negatives(q, k, 3)
    assert idx.shape == sim.shape == (6, 3) and idx.device.type == "meta"
    assert mgccl_ops.hard_negative_loss(q, k, pos, idx, 2.0).device.type == "meta"
    feat = torch.randn(2, 3, 5, 5, device="meta")
    labels, num = mgccl_ops.region_merge(feat, 0.5)
    assert labels.shape == (2, 5, 5) and num.shape == (2,)


def test_device_of_keyset_reads_layouts_and_backends():
    def of(key: str) -> str:
        return devices.device_of_keyset(torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key)))

    assert of("CUDA") == "cuda"
    assert of("MPS") == "mps"
    assert of("SparseCPU") == "cpu (sparse layout)"


def readme_rows() -> dict[str, tuple[str, str]]:
    rows = {}
    for line in README.read_text().splitlines():
        match = re.fullmatch(r"\| `(\w+)` \| (.+?) \| (.+?) \|", line.strip())
        if match and match.group(1) in devices.namespace_ops():
            rows[match.group(1)] = (match.group(2), match.group(3))
    return rows


EXPECTED_WORD = {"C++": "C++", "CUDA C++": "CUDA C++", "Python": "Triton"}


def test_readme_device_table_lists_every_operator():
    assert sorted(readme_rows()) == devices.namespace_ops()


def test_readme_device_table_names_every_registered_kernel():
    rows = readme_rows()
    for name, origins in devices.device_table().items():
        for device, cell in zip(("cpu", "cuda"), rows[name]):
            origin = origins[device]
            if origin is not None:
                assert EXPECTED_WORD[origin] in cell, (name, device, origin, cell)
