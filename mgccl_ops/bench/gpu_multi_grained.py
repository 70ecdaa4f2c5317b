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
from pathlib import Path

import torch

import mgccl_ops
from mgccl_ops import reference
from mgccl_ops.bench import gpu_common, harness, report
from mgccl_ops.bench.multi_grained import ENTITIES, LEVEL_FACTORS, PHRASES, plain_hard_negative_loss

NAME = "gpu_multi_grained"
PROVIDERS = ("mgccl", "pytorch")


def inputs(batch: int, d: int, dtype: str, device: str, seed: int = 0):
    """Three levels (q, pos, weight, q_group), the key bank k [5B, D], its groups and the logit scale."""
    generator = torch.Generator(device=device).manual_seed(seed)
    dtype_ = gpu_common.DTYPES[dtype]
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
    def factory():
        levels, k, k_group, logit_scale = inputs(batch, d, dtype, device)
        leaves = [level[0] for level in levels] + [k, logit_scale]
        negatives = hard_negatives or None

        def forward():
            scale = logit_scale.exp()
            if provider == "mgccl":
                return mgccl_ops.multi_grained_loss(levels, k, scale, k_group=k_group, hard_negatives=negatives)[0]
            if negatives is None:
                return reference.multi_grained_loss(levels, k, scale, k_group=k_group)[0]
            return plain_hard_negative_loss(levels, k, scale, k_group, negatives)

        def step():
            forward().backward()
            for tensor in leaves:
                tensor.grad = None

        return step

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
    element = torch.empty((), dtype=gpu_common.DTYPES[dtype]).element_size()
    traffic = 3 * 2 * (n + m) * d * element
    if not hard_negatives:
        return gpu_common.roofline(6 * n * m * d, traffic)
    return gpu_common.roofline(2 * n * m * d + 6 * n * (hard_negatives + 1) * d, traffic + n * hard_negatives * 8)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hard-negatives", type=int, nargs="+", default=[0, 32], help="0: full softmax")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(gpu_common.DTYPES), default=["bfloat16", "float32"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--time-budget", type=float, default=60.0, help="seconds for the whole run")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))


def run(args: argparse.Namespace) -> list[dict]:
    budget = gpu_common.Budget(args.time_budget)
    context = harness.run_context(args.device)
    rows = []
    for dtype in args.dtypes:
        for hard_negatives in args.hard_negatives:
            mode = "full softmax" if hard_negatives == 0 else f"K={hard_negatives}"
            for batch in args.batches:
                for provider in PROVIDERS:
                    name = f"{provider} ({mode}, {dtype})"
                    params = {"batch": batch, "rows": total_rows(batch), "m": batch * ENTITIES, "d": args.dim,
                              "hard_negatives": hard_negatives or None, "dtype": dtype}  # fmt: skip
                    if budget.spent():
                        rows.append(gpu_common.skipped_row(NAME, name, params, "not run: time budget spent", context))
                        continue
                    predicted = predicted_peak_bytes(provider, batch, args.dim, hard_negatives)
                    if not gpu_common.fits(predicted, args.device):
                        rows.append(gpu_common.skipped_row(NAME, name, params, "skipped: would not fit", context))
                        continue
                    factory = step_factory(provider, batch, args.dim, dtype, hard_negatives, args.device)
                    result = gpu_common.measure(factory, args.device, repeats=args.repeats)
                    row = {"bench": NAME, "provider": name, "params": params, **result, **context}
                    if "time_ms" in result:
                        line = roofline(total_rows(batch), batch * ENTITIES, args.dim, hard_negatives, dtype)
                        row["floor_ms"] = line["floor_ms"]
                        row["percent_of_floor"] = 100 * line["floor_ms"] / result["time_ms"]["median"]
                    rows.append(row)
                    gpu_common.print_row(row, "batch")
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
            ("provider", "provider"),
            ("B", "params.batch"),
            ("query rows", "params.rows"),
            ("keys", "params.m"),
            ("time ms (median)", "time_ms.median"),
            ("p20", "time_ms.p20"),
            ("p80", "time_ms.p80"),
            ("time / pytorch", "time_vs_pytorch"),
            ("roofline floor ms", "floor_ms"),
            ("% of floor", "percent_of_floor"),
            ("peak MiB", "peak_mem_mib"),
            ("pytorch peak / peak", "memory_saving"),
            ("not run", "skipped"),
            ("error", "error"),
        ],
        x_key="batch",
        panels=[("time (ms)", "time_ms.median"), ("peak memory (MiB)", "peak_mem_mib")],
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
