"""GPU benchmark of the multi-grained step (``multi_grained_loss`` forward + backward) against
the same losses in plain PyTorch, in the training shape of ``mgccl_ops.bench.multi_grained``:
levels of B, 4B and 196B queries against a bank of 5B entity keys with phrase groups.

- ``mgccl``: one ``multi_grained_loss`` call (full softmax, or ``hard_negatives=K``);
- ``pytorch``: ``mgccl_ops.reference.multi_grained_loss`` (per level the N_l x M logits) and, with
  hard negatives, ``torch.topk`` mining over the masked similarities and the gathered
  [N_l, K, D] loss (``multi_grained.plain_hard_negative_loss``); skipped where it would not fit.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from mgccl_ops.bench import gpu_common, harness, report
from mgccl_ops.bench.multi_grained import ENTITIES, LEVEL_FACTORS, PHRASES, SHAPE_COLUMNS, step_of

NAME = "gpu_multi_grained"
PROVIDERS = ("mgccl", "pytorch")


def inputs(batch: int, d: int, dtype: str, device: str, seed: int = 0):
    """Three levels (q, pos, weight, q_group), the key bank k [5B, D], its groups and the logit scale."""
    generator = torch.Generator(device=device).manual_seed(seed)
    dtype_ = harness.DTYPES[dtype]
    m = batch * ENTITIES

    def rows(n):
        x = torch.randn(n, d, generator=generator, device=device)
        return torch.nn.functional.normalize(x, dim=1).to(dtype_).requires_grad_()

    k = rows(m)
    k_group = torch.randint(0, PHRASES, (m,), generator=generator, device=device)
    levels = []
    for factor in LEVEL_FACTORS:
        pos = torch.randint(0, m, (batch * factor,), generator=generator, device=device)
        levels.append((rows(batch * factor), pos, 1.0, k_group[pos]))
    return levels, k, k_group, torch.tensor(2.659, device=device, requires_grad=True)


def step_factory(provider: str, batch: int, d: int, dtype: str, hard_negatives: int, device: str) -> Callable:
    """Setup factory (no arguments) of one forward + backward by ``provider`` (hard_negatives 0:
    the full softmax)."""

    def factory():
        return step_of(provider, *inputs(batch, d, dtype, device), hard_negatives or None)

    return factory


def total_rows(batch: int) -> int:
    return batch * sum(LEVEL_FACTORS)


def predicted_peak_bytes(provider: str, batch: int, d: int, hard_negatives: int) -> float:
    n, m = total_rows(batch), batch * ENTITIES
    if provider == "pytorch":
        largest = batch * max(LEVEL_FACTORS)
        gathered = largest * hard_negatives * d * 4 * 3
        return (16 * largest * m if not hard_negatives else 8 * largest * m) + gathered
    return 8 * (n + m) * d * 4 + n * max(hard_negatives, 1) * 16


def roofline(n: int, m: int, d: int, hard_negatives: int, dtype: str) -> dict:
    """Full softmax: 6 N M D (logits, grad q, grad k). Hard negatives: 2 N M D mining plus
    6 N (K + 1) D for the indexed loss; q and k read twice, gradients written, indices read."""
    element = torch.empty((), dtype=harness.DTYPES[dtype]).element_size()
    traffic = 3 * 2 * (n + m) * d * element
    if not hard_negatives:
        return gpu_common.roofline(6 * n * m * d, traffic)
    return gpu_common.roofline(2 * n * m * d + 6 * n * (hard_negatives + 1) * d, traffic + n * hard_negatives * 8)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hard-negatives", type=int, nargs="+", default=[0, 32], help="0: full softmax")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(harness.DTYPES), default=["bfloat16", "float32"])
    gpu_common.add_run_arguments(parser, time_budget=60.0)


def run(args: argparse.Namespace) -> list[dict]:
    context = harness.run_context(args.device)
    sweep = gpu_common.Sweep(NAME, context, args, gpu_common.Budget(args.time_budget), size_key="batch")
    rows = []
    for dtype in args.dtypes:
        for hard_negatives in args.hard_negatives:
            mode = "full softmax" if hard_negatives == 0 else f"K={hard_negatives}"
            for batch in args.batches:
                for provider in PROVIDERS:
                    name = f"{provider} ({mode}, {dtype})"
                    params = {"batch": batch, "rows": total_rows(batch), "m": batch * ENTITIES, "d": args.dim,
                              "hard_negatives": hard_negatives or None, "dtype": dtype}  # fmt: skip
                    factory = step_factory(provider, batch, args.dim, dtype, hard_negatives, args.device)
                    predicted = predicted_peak_bytes(provider, batch, args.dim, hard_negatives)
                    line = roofline(total_rows(batch), batch * ENTITIES, args.dim, hard_negatives, dtype)
                    rows.append(sweep.row(name, params, factory, predicted, line))
    report.add_ratios_to_pytorch([row for row in rows if "time_ms" in row], "batch")
    write(rows, args, context)
    return rows


def write(rows: list[dict], args: argparse.Namespace, context: dict) -> None:
    shape = gpu_common.ROOFLINE_SHAPE
    lines = {
        "full softmax": roofline(shape["n"], shape["m"], shape["d"], 0, "bfloat16"),
        "K=32": roofline(shape["n"], shape["m"], shape["d"], 32, "bfloat16"),
    }
    for row in rows:
        row.setdefault("roofline_32k_512_bf16", lines)
    report.write_report(
        rows,
        args.out,
        NAME,
        f"multi_grained_loss forward + backward, levels B x (1, 4, 196), bank 5B, D = {args.dim}, "
        f"{context['device_name']}",
        columns=[
            *SHAPE_COLUMNS,
            *report.TIME_COLUMNS,
            ("time / pytorch", "time_vs_pytorch"),
            *gpu_common.FLOOR_COLUMNS,
            ("peak MiB", "peak_mem_mib"),
            ("pytorch peak / peak", "memory_saving"),
            *gpu_common.STATUS_COLUMNS,
        ],
        x_key="batch",
        notes=(
            f"mgccl_ops {context['version']}, torch {context['torch']}. One step = forward + backward of the "
            "total over three levels against the bank, gradients to every level, the keys and the logit "
            f"scale. Median of {args.repeats} runs after one warm-up; peak memory is "
            "torch.cuda.max_memory_allocated during one step minus the inputs. The floor is the roofline "
            "time of the row's own shape. "
            + gpu_common.roofline_note("the full-softmax step at N = M = 32k, D = 512, bf16", lines["full softmax"])
            + " "
            + gpu_common.roofline_note("the K = 32 hard-negative step at the same shape", lines["K=32"])
        ),
    )
