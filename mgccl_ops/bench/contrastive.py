"""Benchmark of ``contrastive_loss`` (forward + backward) against plain PyTorch and open_clip.

Providers: ``mgccl`` (the fused op), ``pytorch`` (``mgccl_ops.reference``, which materialises
the N x M logits), ``open_clip`` (its ``ClipLoss``, symmetric case only) and ``torch.mm``
(one N x D by D x M product, for the GFLOP/s ceiling). GFLOP/s of a loss counts the three
products a forward + backward needs (6 N M D flops), whatever the provider actually runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

import mgccl_ops
from mgccl_ops import reference
from mgccl_ops.bench import harness, report

NAME = "contrastive"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _features(n: int, d: int, dtype: str, device: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=1)
    k = torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=1)
    q = q.to(device=device, dtype=DTYPES[dtype]).requires_grad_()
    k = k.to(device=device, dtype=DTYPES[dtype]).requires_grad_()
    logit_scale = torch.tensor(2.659, device=device, requires_grad=True)  # log(1 / 0.07), CLIP's init
    return q, k, logit_scale


def loss_step(provider: str, n: int, d: int, dtype: str, device: str, symmetric: bool) -> Callable[[], None]:
    """Setup factory: inputs for one forward + backward of the loss by ``provider``."""
    q, k, logit_scale = _features(n, d, dtype, device)
    pos = torch.arange(n, device=device)
    if provider == "open_clip":
        from open_clip.loss import ClipLoss

        clip_loss = ClipLoss()

        def forward():
            return clip_loss(q, k, logit_scale.exp())
    else:
        loss_fn = mgccl_ops.contrastive_loss if provider == "mgccl" else reference.contrastive_loss

        def forward():
            return loss_fn(q, k, pos, logit_scale.exp(), symmetric=symmetric)

    def step():
        forward().backward()
        q.grad = k.grad = logit_scale.grad = None

    return step


def mm_step(n: int, d: int, dtype: str, device: str) -> Callable[[], None]:
    """Setup factory: one [n, d] x [d, n] product."""
    q, k, _ = _features(n, d, dtype, device)
    q, k = q.detach(), k.detach()
    return lambda: torch.mm(q, k.T)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--symmetric-max", type=int, default=16384, help="largest N for the symmetric (CLIP) rows")
    parser.add_argument(
        "--materialising-max",
        type=int,
        default=16384,
        help="largest N for the providers that hold N x M matrices (pytorch, open_clip: ~20 GiB at 32768)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    common = {"d": args.dim, "dtype": args.dtype, "device": args.device}
    context = harness.run_context(args.device)
    for n in args.sizes:
        cases = [("torch.mm", "mgccl_ops.bench.contrastive:mm_step", {"n": n, **common}, 2 * n * n * args.dim)]
        for symmetric in (False, True):
            if symmetric and n > args.symmetric_max:
                continue
            for provider in ("mgccl", "pytorch") + (("open_clip",) if symmetric else ()):
                if provider != "mgccl" and n > args.materialising_max:
                    continue
                params = {"provider": provider, "n": n, "symmetric": symmetric, **common}
                name = f"{provider} (symmetric)" if symmetric else provider
                cases.append((name, "mgccl_ops.bench.contrastive:loss_step", params, 6 * n * n * args.dim))
        for name, factory, params, flops in cases:
            step = harness.resolve(factory)(**params)
            timing = harness.time_step(step, args.device, repeats=args.repeats)
            del step
            row = {
                "bench": NAME,
                "provider": name,
                "params": {"n": n, "d": args.dim, "dtype": args.dtype},
                "time_ms": timing,
                "gflops": flops / (timing["median"] * 1e6),
                "peak_mem_mib": harness.peak_memory_mib(factory, params, args.device),
                **context,
            }
            rows.append(row)
            print(
                f"{name:22s} n={n:6d}  {timing['median']:10.1f} ms  {row['gflops']:7.1f} GFLOP/s  "
                f"peak {row['peak_mem_mib']} MiB",
                flush=True,
            )
        _write(rows, args, context)  # after every size, so a later failure keeps what was measured
    return rows


def _write(rows: list[dict], args: argparse.Namespace, context: dict) -> None:
    _add_ratios(rows)
    report.write_report(
        rows,
        args.out,
        NAME,
        f"contrastive_loss forward + backward, D = {args.dim}, {args.dtype}, {context['device_name']}",
        columns=[
            ("provider", "provider"),
            ("N = M", "params.n"),
            ("time ms (median)", "time_ms.median"),
            ("p20", "time_ms.p20"),
            ("p80", "time_ms.p80"),
            ("time / pytorch", "time_vs_pytorch"),
            ("GFLOP/s", "gflops"),
            ("% of torch.mm GFLOP/s", "percent_of_mm"),
            ("peak MiB", "peak_mem_mib"),
            ("pytorch peak / peak", "memory_saving"),
        ],
        x_key="n",
        panels=[("time (ms)", "time_ms.median"), ("peak memory (MiB)", "peak_mem_mib")],
        notes=(
            f"mgccl_ops {context['version']}, torch {context['torch']}. Median of {args.repeats} runs "
            "after one warm-up; peak memory is the growth of the process's resident set during one step "
            "(CPU) or torch.cuda.max_memory_allocated (CUDA), each in a fresh process. GFLOP/s counts "
            "6 N M D flops for a loss step and 2 N M D for torch.mm."
        ),
    )


def _add_ratios(rows: list[dict]) -> None:
    """Adds time and memory relative to the plain-PyTorch row of the same N (and mode)."""
    by_key = {(row["provider"], row["params"]["n"]): row for row in rows}
    for row in rows:
        n = row["params"]["n"]
        symmetric = row["provider"].endswith("(symmetric)")
        baseline = by_key.get(("pytorch (symmetric)" if symmetric else "pytorch", n))
        mm = by_key.get(("torch.mm", n))
        if mm is not None and row["provider"] != "torch.mm":
            row["percent_of_mm"] = 100 * row["gflops"] / mm["gflops"]
        if baseline is not None and row["provider"] != "torch.mm":
            row["time_vs_pytorch"] = row["time_ms"]["median"] / baseline["time_ms"]["median"]
            if row["peak_mem_mib"] and baseline["peak_mem_mib"]:
                row["memory_saving"] = baseline["peak_mem_mib"] / row["peak_mem_mib"]
