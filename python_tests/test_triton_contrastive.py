"""The Triton contrastive_loss kernels (mgccl_ops/triton/contrastive.py) at tile boundaries.

Most tests here need the Triton kernels to serve CPU tensors, i.e. the process started with
``TRITON_INTERPRET=1 MGCCL_TRITON_ON_CPU=1`` (set before ``import mgccl_ops``); elsewhere they
are skipped. ``.ci/run`` runs this file and the op test files (test_contrastive.py, ...) that
way, so the existing op tests run on Triton too. The training-step test runs in any process
that can import triton: it starts two subprocesses, one on the C++ kernels and one on Triton.

Block sizes (mgccl_ops.triton.contrastive.LAUNCH): fp32 64 x 32 rows x keys, fp64 32 x 32,
fp16/bf16 64 x 64; D is padded to a multiple of 16 and swept in chunks of 16 (fp32, fp64) or 64.
The shapes below cross each of these boundaries with remainders.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from compare import assert_close

import mgccl_ops
from mgccl_ops import reference

TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("MGCCL_TRITON_ON_CPU") == "1"
on_triton = pytest.mark.skipif(
    not TRITON_ON_CPU, reason="needs TRITON_INTERPRET=1 MGCCL_TRITON_ON_CPU=1 before import (.ci/run sets them)"
)
needs_triton = pytest.mark.skipif(not mgccl_ops.triton.triton_available(), reason="triton is not installed")

# (N, M, D): N, M across the row/key blocks with remainders; D = 1, 3, 47, 130 (padding, chunks).
BOUNDARY_SHAPES = [(70, 45, 47), (33, 97, 3), (65, 33, 130), (1, 40, 1)]
REDUCTIONS = ["mean", "sum", "none"]


def make_inputs(n, m, d, dtype, *, symmetric=False, seed=0, scale=1.7):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
    k = torch.randn(m, d, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
    if symmetric:
        pos = torch.randperm(n, generator=generator)
    else:
        pos = torch.randint(-1, max(m, 1), (n,), generator=generator)
    weight = torch.rand(n, generator=generator, dtype=torch.float64).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return q, k, pos, weight, torch.tensor(scale, dtype=acc, requires_grad=True)


def loss_and_grads(fn, q, k, pos, scale, **kwargs):
    """The loss and its gradients w.r.t. (q, k, scale) under a fixed upstream gradient."""
    loss = fn(q, k, pos, scale, **kwargs)
    upstream = torch.linspace(-1.0, 2.0, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    return loss, torch.autograd.grad(loss, (q, k, scale), upstream)


def check_against_reference(q, k, pos, scale, dtype, **kwargs):
    """Loss and gradients against the reference evaluated in float64 on the same (rounded) inputs.

    The float64 reference is the exact answer for these inputs, so the comparison measures only
    the kernel's own rounding, at the tolerance of the input dtype.
    """
    ours, our_grads = loss_and_grads(mgccl_ops.contrastive_loss, q, k, pos, scale, **kwargs)
    exact_inputs = [t.detach().double().requires_grad_() for t in (q, k, scale)]
    weight = kwargs.get("weight")
    exact_kwargs = dict(kwargs, weight=None if weight is None else weight.double())
    ref, ref_grads = loss_and_grads(reference.contrastive_loss, *exact_inputs[:2], pos, exact_inputs[2], **exact_kwargs)
    assert ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(ours, ref, dtype, "loss")
    for name, got, want, source in zip(("grad q", "grad k", "grad scale"), our_grads, ref_grads, (q, k, scale)):
        assert got.dtype == source.dtype and got.shape == want.shape, name
        assert_close(got, want, dtype, name)


@on_triton
def test_triton_kernels_serve_cpu_tensors():
    """Guards every test below: the public API must be running the Triton kernels, not C++."""
    assert {"contrastive_loss", "contrastive_loss_backward"} <= set(mgccl_ops.triton.registered())


@on_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", BOUNDARY_SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_boundary_shapes_match_reference(dtype, shape, reduction):
    """Weighted for "mean" and "none", unweighted for "sum" (both paths, without doubling the runs)."""
    q, k, pos, weight, scale = make_inputs(*shape, dtype)
    weight = None if reduction == "sum" else weight
    check_against_reference(q, k, pos, scale, dtype, weight=weight, reduction=reduction)


@on_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,d", [(70, 47), (33, 130)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_symmetric_boundary_shapes_match_reference(dtype, n, d, reduction):
    q, k, pos, weight, scale = make_inputs(n, n, d, dtype, symmetric=True)
    check_against_reference(q, k, pos, scale, dtype, weight=weight, reduction=reduction, symmetric=True)


@on_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_16_bit_inputs_upcast_under_the_interpreter(dtype, symmetric):
    """fp16/bf16 inputs (upcast to fp32 under the interpreter) across the 64 x 64 x 64 blocks."""
    n, m, d = (130, 130, 47) if symmetric else (130, 70, 100)
    q, k, pos, weight, scale = make_inputs(n, m, d, dtype, symmetric=symmetric)
    check_against_reference(q, k, pos, scale, dtype, weight=weight, symmetric=symmetric)


@on_triton
def test_large_logits_stay_finite_across_key_blocks():
    """Online log-sum-exp: logits up to ~400 whose maximum sits in a later key block."""
    q, k, pos, _, _ = make_inputs(40, 100, 20, torch.float64, seed=3)
    with torch.no_grad():
        k[90:] *= 4.0
    scale = torch.tensor(30.0, dtype=torch.float64, requires_grad=True)
    check_against_reference(q, k, pos, scale, torch.float64, reduction="sum")


@on_triton
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored_across_blocks(reduction):
    q, k, _, weight, scale = make_inputs(70, 45, 47, torch.float32)
    pos = torch.full((70,), -1)
    loss, (grad_q, grad_k, grad_scale) = loss_and_grads(
        mgccl_ops.contrastive_loss, q, k, pos, scale, weight=weight, reduction=reduction
    )
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(grad_q, torch.zeros_like(q)) and torch.equal(grad_k, torch.zeros_like(k))
    assert grad_scale.item() == 0.0


@on_triton
@pytest.mark.parametrize("n,m,symmetric", [(0, 45, False), (5, 0, False), (0, 0, True)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_queries_or_keys(n, m, symmetric, reduction):
    q, k, _, _, scale = make_inputs(n, m, 47, torch.float32, symmetric=symmetric)
    pos = torch.arange(n) if symmetric else torch.full((n,), -1)
    loss = mgccl_ops.contrastive_loss(q, k, pos, scale, reduction=reduction, symmetric=symmetric)
    assert loss.shape == ((n,) if reduction == "none" else ())
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(q.grad, torch.zeros_like(q)) and torch.equal(k.grad, torch.zeros_like(k))
    assert scale.grad.item() == 0.0


@on_triton
@pytest.mark.parametrize("wanted", ["q", "k", "scale"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_one_gradient_at_a_time(wanted, symmetric):
    """Each grad_mask pattern launches a different kernel variant (WANT_Q / WANT_SCALE)."""
    q, k, pos, weight, scale = make_inputs(70, 70, 47, torch.float32, symmetric=symmetric)
    inputs = {"q": q, "k": k, "scale": scale}
    for name, tensor in inputs.items():
        tensor.requires_grad_(name == wanted)
    kwargs = {"weight": weight, "symmetric": symmetric}
    (ours,) = torch.autograd.grad(mgccl_ops.contrastive_loss(q, k, pos, scale, **kwargs), inputs[wanted])
    (ref,) = torch.autograd.grad(reference.contrastive_loss(q, k, pos, scale, **kwargs), inputs[wanted])
    assert_close(ours, ref, torch.float32, f"grad {wanted}")


@on_triton
def test_mean_divides_by_a_negative_total_weight():
    """Contract: "mean" divides by W = sum of the weights of kept rows whatever its sign."""
    q, k, pos, _, scale = make_inputs(70, 45, 47, torch.float64)
    weight = torch.linspace(-2.0, 0.5, 70, dtype=torch.float64)
    kept = pos >= 0
    rows = reference.contrastive_loss(q, k, pos, scale, weight=weight, reduction="none")
    expected = rows.sum() / weight[kept].sum()
    assert weight[kept].sum() < 0
    assert_close(mgccl_ops.contrastive_loss(q, k, pos, scale, weight=weight), expected, torch.float64)


@on_triton
def test_nan_weight_makes_mean_and_gradients_nan():
    q, k, pos, weight, scale = make_inputs(70, 45, 47, torch.float32)
    pos[3] = 1
    weight[3] = float("nan")
    loss, (grad_q, grad_k, grad_scale) = loss_and_grads(mgccl_ops.contrastive_loss, q, k, pos, scale, weight=weight)
    # docs/ops.md: W is NaN, so the loss and every gradient are NaN, except the rows of grad_q of
    # ignored rows (pos = -1), which never read their weight and stay 0.
    kept = pos >= 0
    assert torch.isnan(loss) and torch.isnan(grad_k).all() and torch.isnan(grad_scale)
    assert torch.isnan(grad_q[kept]).all() and (grad_q[~kept] == 0).all() and (~kept).any()


@on_triton
def test_non_contiguous_and_offset_inputs():
    """Views with a storage offset (unaligned start) and strides are copied before launch."""
    base_q = torch.randn(71, 48, dtype=torch.float64)
    base_k = torch.randn(46, 96, dtype=torch.float64)
    q = base_q[1:, 1:]  # offset by 49 elements: not 16-byte aligned for the kernels' vector loads
    k = base_k[1:, ::2][:, :47]  # stride 2
    pos = torch.randint(-1, 45, (70,), generator=torch.Generator().manual_seed(5))
    ours = mgccl_ops.contrastive_loss(q, k, pos, 1.3, reduction="none")
    ref = reference.contrastive_loss(q.contiguous(), k.contiguous(), pos, 1.3, reduction="none")
    assert_close(ours, ref, torch.float64)


@on_triton
def test_bad_pos_raises_from_the_triton_kernel():
    q, k, _, _, _ = make_inputs(70, 45, 3, torch.float32)
    with pytest.raises(RuntimeError, match=r"pos values should lie in \[-1, 45\), got min 0 and max 45"):
        mgccl_ops.contrastive_loss(q, k, torch.full((70,), 45).index_fill(0, torch.tensor([0]), 0), 1.0)


def test_provider_and_cpu_switches_are_checked(monkeypatch):
    monkeypatch.setenv("MGCCL_GPU_KERNELS", "cuda")
    assert mgccl_ops.triton.gpu_provider() == "cuda"
    monkeypatch.setenv("MGCCL_GPU_KERNELS", "cutlass")
    with pytest.raises(ValueError, match=r"MGCCL_GPU_KERNELS should be one of \('triton', 'cuda'\), got 'cutlass'"):
        mgccl_ops.triton.gpu_provider()
    monkeypatch.setenv("MGCCL_TRITON_ON_CPU", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 too"):
        mgccl_ops.triton.on_cpu()
    monkeypatch.setenv("MGCCL_TRITON_ON_CPU", "0")
    assert not mgccl_ops.triton.on_cpu()


@needs_triton
def test_every_kernel_module_lists_its_aot_configs():
    """scripts/check_triton_aot.py compiles what these lists hold; each kernel of a module appears."""
    for module_name in mgccl_ops.triton.modules():
        module = importlib.import_module(module_name)
        kernels = {
            name for name, value in vars(module).items() if hasattr(value, "arg_names") and name.endswith("_kernel")
        }
        listed = {config["kernel"].__name__ for config in module.AOT_CONFIGS}
        assert kernels and kernels == listed, (module_name, kernels, listed)


TRAIN_STEP = """
import sys, torch
import mgccl_ops
from mgccl_ops.data.collate import collate_pairs
from mgccl_ops.data.synthetic import SyntheticShapes
from mgccl_ops.train.config import TrainConfig
from mgccl_ops.train.step import batch_loss
from mgccl_ops.train.trainer import build_default_model
cfg = TrainConfig(out_dir=sys.argv[1], batch_size=6, num_samples=16, image_size=32, dim=16, backend="fused")
model = build_default_model(cfg)
dataset = SyntheticShapes("train", cfg.num_samples, seed=cfg.seed, size=cfg.image_size)
batch = collate_pairs([dataset[i] for i in range(cfg.batch_size)])
loss, parts = batch_loss(model, batch, mgccl_ops, cfg.objective)
loss.backward()
grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
result = {"loss": loss.detach(), "parts": {name: v.detach() for name, v in parts.items()}, "grads": grads}
torch.save(dict(result, triton_on_cpu=mgccl_ops.triton.on_cpu()), sys.argv[1] + "/step.pt")
"""


def run_training_step(out_dir: Path, on_triton: bool) -> dict:
    """Loss, per-level losses and parameter gradients of one training step, in a fresh process."""
    env = dict(os.environ)
    for name in ("TRITON_INTERPRET", "MGCCL_TRITON_ON_CPU"):
        env.pop(name, None)
    if on_triton:
        env.update(TRITON_INTERPRET="1", MGCCL_TRITON_ON_CPU="1")
    out_dir.mkdir()
    # Run outside the checkout: `python -c` puts the working directory first on sys.path, where
    # the uncompiled sources would shadow the installed package.
    done = subprocess.run(
        [sys.executable, "-c", TRAIN_STEP, str(out_dir)],
        env=env, cwd=out_dir, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out_dir / "step.pt")


@needs_triton
@pytest.mark.slow
def test_training_step_on_triton_equals_the_cpp_kernels(tmp_path):
    """Same model, batch and objective: loss, level losses and every parameter gradient agree.

    Gradients are compared before the optimiser: AdamW's first update is about lr * sign(grad),
    which turns fp32 rounding in near-zero gradients into lr-sized parameter differences.
    """
    cpp = run_training_step(tmp_path / "cpp", on_triton=False)
    tri = run_training_step(tmp_path / "triton", on_triton=True)
    assert tri["triton_on_cpu"] and not cpp["triton_on_cpu"]
    assert_close(tri["loss"], cpp["loss"], torch.float32, "loss")
    assert set(tri["parts"]) == set(cpp["parts"]) and "object" in cpp["parts"]
    for level, value in cpp["parts"].items():
        assert_close(tri["parts"][level], value, torch.float32, level)
    assert set(tri["grads"]) == set(cpp["grads"]) and cpp["grads"]
    for name, grad in cpp["grads"].items():
        assert_close(tri["grads"][name], grad, torch.float32, f"grad {name}")
