"""Benchmark of ``contrastive_loss`` (forward + backward) against plain PyTorch and open_clip.

Providers: ``mgccl`` (the fused op), ``pytorch`` (``mgccl_ops.reference``, which materialises
the N x M logits), ``open_clip`` (its ``ClipLoss``, symmetric case only) and ``torch.mm``
(one N x D by D x M product, for the GFLOP/s ceiling). GFLOP/s of a loss counts the three
products a forward + backward needs (6 N M D flops), whatever the provider actually runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

import mgccl_ops
from mgccl_ops import reference
from mgccl_ops.bench import harness, report

NAME = "contrastive"


def unit_features(n: int, d: int, dtype: str, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm q, k [n, d] of ``dtype`` on ``device`` (leaves), drawn on the CPU from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=1)
    k = torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=1)
    q = q.to(device=device, dtype=harness.DTYPES[dtype]).requires_grad_()
    k = k.to(device=device, dtype=harness.DTYPES[dtype]).requires_grad_()
    return q, k


def _features(n: int, d: int, dtype: str, device: str, seed: int = 0):
    q, k = unit_features(n, d, dtype, device, seed)
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
    """Setup factory: one [n, d] x [d, n] product (of the loss step's q and k)."""
    q, k = (t.detach() for t in unit_features(n, d, dtype, device))
    return lambda: torch.mm(q, k.T)


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """--sizes (N = M), --dim, --dtype and --device of the contrastive benchmarks."""
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtype", choices=sorted(harness.DTYPES), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_shape_arguments(parser)
    parser.add_argument("--symmetric-max", type=int, default=16384, help="largest N for the symmetric (CLIP) rows")
    parser.add_argument(
        "--materialising-max",
        type=int,
        default=16384,
        help="largest N for the providers that hold N x M matrices (pytorch, open_clip: ~20 GiB at 32768)",
    )
    harness.add_output_arguments(parser)


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
        rows += measure_gflops_cases(NAME, cases, n, args, context, name_width=22)
        _write(rows, args, context)  # after every size, so a later failure keeps what was measured
    return rows


def measure_gflops_cases(
    bench: str, cases: list[tuple], n: int, args: argparse.Namespace, context: dict, name_width: int
) -> list[dict]:
    """The rows of the cases ``(provider, factory path, factory params, flops)`` of one N = M (at
    ``args.dim``, ``args.dtype``, ``args.device``, ``args.repeats``), each with its GFLOP/s, printed."""
    rows = []
    for name, factory, params, flops in cases:
        row = harness.measure_case(
            bench,
            name,
            factory,
            params,
            {"n": n, "d": args.dim, "dtype": args.dtype},
            context,
            device=args.device,
            repeats=args.repeats,
            derived=lambda timing, flops=flops: {"gflops": flops / (timing["median"] * 1e6)},
        )
        rows.append(row)
        print(
            f"{name:{name_width}s} n={n:6d}  {row['time_ms']['median']:10.1f} ms  {row['gflops']:7.1f} GFLOP/s  "
            f"peak {row['peak_mem_mib']} MiB",
            flush=True,
        )
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
            *report.TIME_COLUMNS,
            ("time / pytorch", "time_vs_pytorch"),
            ("GFLOP/s", "gflops"),
            ("% of torch.mm GFLOP/s", "percent_of_mm"),
            ("peak MiB", "peak_mem_mib"),
            ("pytorch peak / peak", "memory_saving"),
        ],
        x_key="n",
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
        if row["provider"] != "torch.mm":
            report.add_ratios(row, baseline, "time_vs_pytorch", baseline)
