"""GPU benchmark of ``contrastive_loss`` (CLIP: symmetric, forward + backward) against eager
PyTorch, open_clip's ClipLoss, Inf-CL and the CUDA C++ provider, at N = M = 8k to 256k.

Providers, all computing the symmetric CLIP loss of q [N, D] and k [N, D] with ``logit_scale``:

- ``mgccl (Triton)``: the op with the default GPU kernels;
- ``mgccl (CUDA C++)``: the op with ``MGCCL_GPU_KERNELS=cuda``, measured in a subprocess (the
  provider is chosen at import);
- ``pytorch``: ``mgccl_ops.reference.contrastive_loss`` (float32 N x M logits);
- ``open_clip``: ``open_clip.loss.ClipLoss`` (two N x M logit matrices in the input dtype);
- ``inf_cl``: Inf-CL's ``cal_inf_loss`` in both directions, averaged (single GPU: its tiled
  Triton kernels; it computes in float32 whatever the input dtype). Optional import;
- ``torch.mm``: one [N, D] x [D, N] product, the ceiling of the matrix-product rate.

Providers that hold N x M matrices are skipped where their predicted peak exceeds 80% of the
device (and an out-of-memory error is recorded as such). ``--time-budget`` bounds the run: the
cases are ordered bf16 D = 512 first, and those past the budget are listed as not run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

import mgccl_ops
from mgccl_ops import reference
from mgccl_ops.bench import gpu_common, harness, report

NAME = "gpu_contrastive"
PROVIDERS = ("mgccl (Triton)", "mgccl (CUDA C++)", "pytorch", "open_clip", "inf_cl", "torch.mm")


def features(n: int, d: int, dtype: str, device: str, seed: int = 0):
    """Unit-norm q, k [n, d] (leaves) and CLIP's initial logit scale, on ``device``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(n, d, generator=generator, device=device)
    k = torch.randn(n, d, generator=generator, device=device)
    q = torch.nn.functional.normalize(q, dim=1).to(harness.DTYPES[dtype]).requires_grad_()
    k = torch.nn.functional.normalize(k, dim=1).to(harness.DTYPES[dtype]).requires_grad_()
    logit_scale = torch.tensor(2.659, device=device, requires_grad=True)
    return q, k, logit_scale


def loss_fn(provider: str, n: int, device: str) -> Callable:
    """``fn(q, k, scale) -> loss`` of a provider."""
    labels = torch.arange(n, device=device)
    if provider.startswith("mgccl"):
        return lambda q, k, scale: mgccl_ops.contrastive_loss(q, k, labels, scale, symmetric=True)
    if provider == "pytorch":
        return lambda q, k, scale: reference.contrastive_loss(q, k, labels, scale, symmetric=True)
    if provider == "open_clip":
        from open_clip.loss import ClipLoss

        clip_loss = ClipLoss()
        return lambda q, k, scale: clip_loss(q, k, scale)
    if provider == "inf_cl":
        from inf_cl import cal_inf_loss

        return lambda q, k, scale: (cal_inf_loss(q, k, scale=scale) + cal_inf_loss(k, q, scale=scale)) / 2
    raise ValueError(f"unknown provider {provider!r}")


def step_factory(provider: str, n: int, d: int, dtype: str, device: str) -> Callable[[], Callable[[], None]]:
    def factory():
        q, k, logit_scale = features(n, d, dtype, device)
        if provider == "torch.mm":
            q, k = q.detach(), k.detach()
            return lambda: torch.mm(q, k.T)
        fn = loss_fn(provider, n, device)

        def step():
            fn(q, k, logit_scale.exp()).backward()
            q.grad = k.grad = logit_scale.grad = None

        return step

    return factory


def predicted_peak_bytes(provider: str, n: int, d: int, dtype: str) -> float:
    """A generous estimate of the step's peak beyond the inputs (for skipping, not reporting)."""
    element = torch.empty((), dtype=harness.DTYPES[dtype]).element_size()
    matrix = n * n
    if provider == "pytorch":
        return 16 * matrix  # float32 logits, their softmax and gradient, the column direction
    if provider == "open_clip":
        return 6 * matrix * element + 2 * matrix * 4
    if provider == "torch.mm":
        return matrix * element
    return 8 * n * d * 4  # the fused providers and Inf-CL: O(N D)


def flops(n: int, d: int, provider: str) -> float:
    """6 N M D for a loss step (logits, grad q, grad k), 2 N M D for torch.mm."""
    return (2 if provider == "torch.mm" else 6) * n * n * d


def bytes_moved(n: int, d: int, dtype: str, provider: str) -> float:
    """Least traffic: q and k read twice and both gradients written (torch.mm: inputs and output)."""
    element = torch.empty((), dtype=harness.DTYPES[dtype]).element_size()
    if provider == "torch.mm":
        return 2 * n * d * element + n * n * element
    return 6 * n * d * element


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 32768, 131072, 262144])
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 768])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(harness.DTYPES), default=["bfloat16", "float32"])
    parser.add_argument("--float32-max", type=int, default=65536, help="largest N for float32 (IEEE, ~12x slower)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    gpu_common.add_run_arguments(parser, time_budget=170.0)
    parser.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)  # the CUDA C++ subprocess


def grid(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(dtype, d, n) in the order of importance: bf16 before fp32, D = 512 before 768, small N first."""
    cases = []
    for d in args.dims:
        for dtype in args.dtypes:
            cases += [(dtype, d, n) for n in args.sizes if dtype != "float32" or n <= args.float32_max]
    return cases


def run_cases(args: argparse.Namespace, providers: list[str], budget: gpu_common.Budget) -> list[dict]:
    sweep = gpu_common.Sweep(NAME, harness.run_context(args.device), args, budget, size_key="n")
    rows = []
    for dtype, d, n in grid(args):
        for provider in providers:
            factory = step_factory(provider, n, d, dtype, args.device)
            predicted = predicted_peak_bytes(provider, n, d, dtype)
            line = gpu_common.roofline(flops(n, d, provider), bytes_moved(n, d, dtype, provider))
            unsupported = "Inf-CL needs D % 256 == 0" if provider == "inf_cl" and d % 256 else None
            params = {"n": n, "d": d, "dtype": dtype}
            rows.append(
                sweep.row(provider, params, factory, predicted, line, unsupported=unsupported, with_tflops=True)
            )
    return rows


def cuda_cpp_rows(args: argparse.Namespace, budget: gpu_common.Budget) -> list[dict]:
    """The CUDA C++ provider's rows, measured in a subprocess with ``MGCCL_GPU_KERNELS=cuda``."""
    with tempfile.TemporaryDirectory() as temp:
        argv = [sys.executable, "-m", "mgccl_ops.bench", NAME, "--rows-only", "--out", temp,
                "--providers", "mgccl (CUDA C++)", "--device", args.device, "--repeats", str(args.repeats),
                "--float32-max", str(args.float32_max), "--time-budget", str(max(budget.left() * 0.3, 1.0)),
                "--sizes", *map(str, args.sizes), "--dims", *map(str, args.dims), "--dtypes", *args.dtypes]  # fmt: skip
        env = os.environ | {"MGCCL_GPU_KERNELS": "cuda"}
        result = subprocess.run(argv, env=env, text=True, capture_output=True, timeout=max(budget.left(), 1.0) + 60)
        print(result.stdout, end="", flush=True)
        if result.returncode != 0:
            print(f"the CUDA C++ provider failed:\n{result.stderr[-3000:]}", file=sys.stderr)
            context = harness.run_context(args.device)
            return [gpu_common.skipped_row(NAME, "mgccl (CUDA C++)", {}, f"failed (exit {result.returncode})", context)]
        return json.loads((Path(temp) / f"{NAME}.rows.json").read_text())


def run(args: argparse.Namespace) -> list[dict]:
    budget = gpu_common.Budget(args.time_budget)
    if args.rows_only:
        rows = run_cases(args, list(args.providers), budget)
        report.write_atomic(args.out / f"{NAME}.rows.json", json.dumps(rows).encode())
        return rows
    in_process = [p for p in args.providers if p != "mgccl (CUDA C++)"]
    rows = cuda_cpp_rows(args, budget) if "mgccl (CUDA C++)" in args.providers else []
    rows += run_cases(args, in_process, budget)
    rows.sort(key=lambda row: grid_order(args, row))
    write(rows, args)
    return rows


def grid_order(args: argparse.Namespace, row: dict) -> tuple:
    params = row["params"]
    key = (params.get("dtype"), params.get("d"), params.get("n"))
    cases = grid(args)
    return (cases.index(key) if key in cases else len(cases), PROVIDERS.index(row["provider"]))


def write(rows: list[dict], args: argparse.Namespace) -> None:
    context = harness.run_context(args.device)
    shape = gpu_common.ROOFLINE_SHAPE
    n, d = shape["n"], shape["d"]
    line = gpu_common.roofline(flops(n, d, "loss"), bytes_moved(n, d, "bfloat16", "loss"))
    for row in rows:
        row.setdefault("roofline_32k_512_bf16", line)
    report.write_report(
        rows,
        args.out,
        NAME,
        f"contrastive_loss (CLIP, symmetric) forward + backward on {context['device_name']}",
        columns=[
            ("provider", "provider"),
            ("dtype", "params.dtype"),
            ("D", "params.d"),
            ("N = M", "params.n"),
            *report.TIME_COLUMNS,
            ("TFLOP/s", "tflops"),
            *gpu_common.FLOOR_COLUMNS,
            ("peak MiB", "peak_mem_mib"),
            *gpu_common.STATUS_COLUMNS,
        ],
        x_key="n",
        notes=(
            f"mgccl_ops {context['version']}, torch {context['torch']}. Median of {args.repeats} runs after "
            "one warm-up; peak memory is torch.cuda.max_memory_allocated during one step minus the inputs. "
            "TFLOP/s counts 6 N M D for a loss step (the logits and both gradients) and 2 N M D for "
            "torch.mm; the floor is the roofline time of the row's own shape. "
            + gpu_common.roofline_note("the loss step at N = M = 32k, D = 512, bf16", line)
            + f" The plot shows {args.dtypes[0]}, D = {args.dims[0]}."
        ),
    )
    first = [r for r in rows if r["params"].get("dtype") == args.dtypes[0] and r["params"].get("d") == args.dims[0]]
    report.plot(first, "n", report.TIME_AND_MEMORY_PANELS,
                f"contrastive_loss (CLIP), {args.dtypes[0]}, D = {args.dims[0]}", args.out / f"{NAME}.png")  # fmt: skip
