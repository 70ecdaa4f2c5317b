"""The Triton kernel of sigmoid_contrastive_loss, run on CPU tensors by the Triton interpreter.

The interpreter must be on before triton is first imported, so outside an interpreter run
(``TRITON_INTERPRET=1``) ``test_in_interpreter`` runs this file in a subprocess with it set, and
the kernel tests run there. The schema function is compared with the C++ CPU kernel and the
reference. Once ``mgccl_ops.triton`` registers it, ``MGCCL_TRITON_ON_CPU=1`` also runs the
whole ``test_sigmoid_contrastive.py`` through it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from compare import assert_close
from test_sigmoid_contrastive import make_inputs, value_and_grads

from mgccl_ops import reference

pytest.importorskip("triton")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
in_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs in test_in_interpreter's subprocess")


@pytest.mark.skipif(INTERPRETED, reason="this process already runs the interpreter")
def test_in_interpreter(tmp_path):
    # The subprocess imports mgccl_ops as this process does (installed, or PYTHONPATH's checkout),
    # run from outside the checkout: `-m` would put the uncompiled sources first on sys.path.
    env = os.environ | {"TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary


@pytest.fixture(scope="module")
def kernel_module():
    from mgccl_ops.triton import sigmoid_contrastive

    return sigmoid_contrastive


def run_kernel(module, q, k, scale, bias, grad_mask=(True, True, True, True)):
    return module.sigmoid_contrastive_loss(q.detach(), k.detach(), scale.detach(), bias.detach(), list(grad_mask))


@in_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 64, 32), (37, 70, 17), (130, 65, 200), (5, 5, 0)])
def test_matches_reference(kernel_module, dtype, shape):
    q, k, scale, bias = make_inputs(*shape, dtype)
    loss, grad_q, grad_k, grad_scale, grad_bias = run_kernel(kernel_module, q, k, scale, bias)
    ref = value_and_grads(reference.sigmoid_contrastive_loss, q, k, scale, bias)
    for name, a, b in zip(
        ("loss", "grad_q", "grad_k", "grad_scale", "grad_bias"), (loss, grad_q, grad_k, grad_scale, grad_bias), ref
    ):
        assert a.dtype == b.dtype, f"{name}: {a.dtype} != {b.dtype}"
        assert_close(a, b, dtype, name)


@in_interpreter
@pytest.mark.parametrize(
    "grad_mask", [(False, False, False, False), (False, False, True, False), (True, False, False, True)]
)
def test_grad_mask(kernel_module, grad_mask):
    q, k, scale, bias = make_inputs(40, 50, 6, torch.float64, scale=3.0, bias=-2.0)
    outputs = run_kernel(kernel_module, q, k, scale, bias, grad_mask)
    cpu = torch.ops.mgccl.sigmoid_contrastive_loss.default(
        q.detach(), k.detach(), scale.detach(), bias.detach(), list(grad_mask)
    )
    for name, a, b in zip(("loss", "grad_q", "grad_k", "grad_scale", "grad_bias"), outputs, cpu):
        assert a.shape == b.shape, f"{name}: {tuple(a.shape)} != {tuple(b.shape)}"
        assert_close(a, b, torch.float64, name)


@in_interpreter
@pytest.mark.parametrize("n, m", [(0, 5), (5, 0)])
def test_empty(kernel_module, n, m):
    q, k, scale, bias = make_inputs(n, m, 4, torch.float32)
    loss, grad_q, grad_k, grad_scale, grad_bias = run_kernel(kernel_module, q, k, scale, bias)
    assert loss.item() == 0.0 and grad_q.shape == (n, 4) and grad_k.shape == (m, 4)
    assert grad_scale.item() == 0.0 and grad_bias.item() == 0.0


@in_interpreter
def test_aot_configs_cover_every_launch(kernel_module):
    configs = kernel_module.AOT_CONFIGS
    block_ds = {c["constexprs"]["BLOCK_D"] for c in configs}
    assert {kernel_module._block_d(d, torch.bfloat16) for d in (1, 17, 40, 64, 100, 512, 1024)} <= block_ds
    for config in configs:
        assert set(config["signature"]) | set(config["constexprs"]) >= {"Q", "K", "params_ptr", "BLOCK_D"}
