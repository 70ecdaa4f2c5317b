"""Benchmark of ``sigmoid_contrastive_loss`` (forward + backward) against open_clip's SigLipLoss.

Providers: ``mgccl`` (the fused op), ``open_clip`` (its ``SigLipLoss``, which builds the N x N
logits, labels and log-sigmoid terms), ``pytorch`` (``mgccl_ops.reference``, likewise
materialising) and ``torch.mm`` (one N x D by D x N product, for the GFLOP/s ceiling). GFLOP/s
of a loss counts the three products a forward + backward needs (6 N^2 D flops), whatever the
provider actually runs (the fused CPU kernel runs four: it recomputes the logits for grad_k).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

import mgccl_ops
from mgccl_ops import reference
from mgccl_ops.bench import harness, report
from mgccl_ops.bench.contrastive import add_shape_arguments, measure_gflops_cases, unit_features

NAME = "sigmoid_contrastive"


def _features(n: int, d: int, dtype: str, device: str, seed: int = 0):
    q, k = unit_features(n, d, dtype, device, seed)
    # SigLIP's initialisation: logit_scale = log(10), logit_bias = -10.
    logit_scale = torch.tensor(2.302585, device=device, requires_grad=True)
    logit_bias = torch.tensor(-10.0, device=device, requires_grad=True)
    return q, k, logit_scale, logit_bias


def loss_step(provider: str, n: int, d: int, dtype: str, device: str) -> Callable[[], None]:
    """Setup factory: inputs for one forward + backward of the loss by ``provider``."""
    q, k, logit_scale, logit_bias = _features(n, d, dtype, device)
    if provider == "open_clip":
        from open_clip.loss import SigLipLoss

        loss_fn = SigLipLoss()
    else:
        loss_fn = mgccl_ops.sigmoid_contrastive_loss if provider == "mgccl" else reference.sigmoid_contrastive_loss

    def step():
        loss_fn(q, k, logit_scale.exp(), logit_bias).backward()
        q.grad = k.grad = logit_scale.grad = logit_bias.grad = None

    return step


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_shape_arguments(parser)
    parser.add_argument(
        "--materialising-max",
        type=int,
        default=16384,
        help="largest N for the providers that hold N x N matrices (open_clip, pytorch: ~30 GiB at 32768)",
    )
    parser.add_argument("--providers", nargs="+", default=["torch.mm", "mgccl", "open_clip", "pytorch"])
    harness.add_output_arguments(parser, repeats=1)


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    common = {"d": args.dim, "dtype": args.dtype, "device": args.device}
    context = harness.run_context(args.device)
    for n in args.sizes:
        cases = []
        for provider in args.providers:
            if provider in ("open_clip", "pytorch") and n > args.materialising_max:
                continue
            flops = (2 if provider == "torch.mm" else 6) * n * n * args.dim
            if provider == "torch.mm":
                cases.append((provider, "mgccl_ops.bench.contrastive:mm_step", {"n": n, **common}, flops))
            else:
                params = {"provider": provider, "n": n, **common}
                cases.append((provider, "mgccl_ops.bench.sigmoid_contrastive:loss_step", params, flops))
        rows += measure_gflops_cases(NAME, cases, n, args, context, name_width=10)
        _write(rows, args, context)  # after every size, so a later failure keeps what was measured
    return rows


def _write(rows: list[dict], args: argparse.Namespace, context: dict) -> None:
    _add_ratios(rows)
    report.write_report(
        rows,
        args.out,
        NAME,
        f"sigmoid_contrastive_loss (SigLIP) forward + backward vs open_clip SigLipLoss, D = {args.dim}, "
        f"{args.dtype}, {context['device_name']}",
        columns=[
            ("provider", "provider"),
            ("N = M", "params.n"),
            ("time ms (median)", "time_ms.median"),
            ("time / open_clip", "time_vs_open_clip"),
            ("GFLOP/s", "gflops"),
            ("peak MiB", "peak_mem_mib"),
            ("open_clip peak / peak", "memory_saving"),
        ],
        x_key="n",
        notes=(
            f"mgccl_ops {context['version']}, torch {context['torch']}. One timed run after one warm-up "
            f"(median of {args.repeats}); peak memory is the growth of the process's resident set during "
            "one step (CPU) or torch.cuda.max_memory_allocated (CUDA), each in a fresh process. GFLOP/s "
            "counts 6 N^2 D flops for a loss step and 2 N^2 D for torch.mm. open_clip and pytorch stop at "
            f"N = {args.materialising_max} (their N x N matrices outgrow this machine's memory beyond)."
        ),
    )


def _add_ratios(rows: list[dict]) -> None:
    """Adds time and memory relative to the open_clip row of the same N."""
    baseline = {row["params"]["n"]: row for row in rows if row["provider"] == "open_clip"}
    for row in rows:
        base = baseline.get(row["params"]["n"])
        if row["provider"] != "torch.mm":
            report.add_ratios(row, base, "time_vs_open_clip", base)
