"""GPU benchmark of ``topk_hard_negatives`` against faiss-gpu ``IndexFlatIP`` and ``torch.mm`` +
``torch.topk``: N = M queries and keys, each row's positive (key i) excluded.

- ``mgccl``: ``topk_hard_negatives(q, k, num, pos=arange(N))``, never the N x M similarities;
- ``torch.mm + topk``: the N x M similarities in the input dtype, the positive set to -inf,
  ``torch.topk``; skipped where the matrix would not fit;
- ``faiss-gpu``: ``GpuIndexFlatIP`` built over the keys inside the step (a training step mines a
  fresh bank), searched for num + 1 candidates (faiss cannot exclude a key per query), then the
  positive dropped. float32 only (its inputs are converted); its temporary memory is allocated
  outside torch's allocator, so its peak column shows only the torch tensors. Optional import.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

import mgccl_ops
from mgccl_ops.bench import gpu_common, harness, report
from mgccl_ops.bench.hard_negatives import drop_positive, mm_topk_step

NAME = "gpu_mining"
PROVIDERS = ("mgccl", "torch.mm + topk", "faiss-gpu")


def step_factory(provider: str, n: int, d: int, num: int, dtype: str, device: str) -> Callable[[], Callable]:
    def factory():
        generator = torch.Generator(device=device).manual_seed(0)
        q = torch.nn.functional.normalize(torch.randn(n, d, generator=generator, device=device), dim=1)
        k = torch.nn.functional.normalize(torch.randn(n, d, generator=generator, device=device), dim=1)
        q, k = q.to(harness.DTYPES[dtype]), k.to(harness.DTYPES[dtype])
        pos = torch.arange(n, device=device)
        if provider == "mgccl":
            return lambda: mgccl_ops.topk_hard_negatives(q, k, num, pos=pos)
        if provider == "torch.mm + topk":
            return mm_topk_step(q, k, pos, num)
        if provider == "faiss-gpu":
            import faiss
            import faiss.contrib.torch_utils  # noqa: F401  (lets faiss take torch CUDA tensors)

            resources = faiss.StandardGpuResources()
            q32, k32 = q.float(), k.float()

            def faiss_search():
                index = faiss.GpuIndexFlatIP(resources, d)
                index.add(k32)
                sim, idx = index.search(q32, num + 1)
                return drop_positive(idx, sim, pos, num)

            return faiss_search
        raise ValueError(f"unknown provider {provider!r}")

    return factory


def predicted_peak_bytes(provider: str, n: int, num: int, dtype: str) -> float:
    element = torch.empty((), dtype=harness.DTYPES[dtype]).element_size()
    if provider == "torch.mm + topk":
        return 2 * n * n * element + n * num * 16
    return 4 * n * num * 12 + 2**28


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--nums", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(harness.DTYPES), default=["bfloat16", "float32"])
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    gpu_common.add_run_arguments(parser, time_budget=60.0)


def run(args: argparse.Namespace) -> list[dict]:
    context = harness.run_context(args.device)
    sweep = gpu_common.Sweep(NAME, context, args, gpu_common.Budget(args.time_budget), size_key="n")
    rows = []
    for dtype in args.dtypes:
        for num in args.nums:
            for n in args.sizes:
                for provider in args.providers:
                    name = f"{provider} (num={num}, {dtype})"
                    params = {"n": n, "d": args.dim, "num": num, "dtype": dtype}
                    factory = step_factory(provider, n, args.dim, num, dtype, args.device)
                    predicted = predicted_peak_bytes(provider, n, num, dtype)
                    rows.append(sweep.row(name, params, factory, predicted, roofline(n, args.dim, num, dtype)))
    write(rows, args, context)
    return rows


def roofline(n: int, d: int, num: int, dtype: str) -> dict:
    """2 N M D FLOPs of the similarities; q and k read once, idx (int64) and sim (fp32) written."""
    element = torch.empty((), dtype=harness.DTYPES[dtype]).element_size()
    return gpu_common.roofline(2 * n * n * d, 2 * n * d * element + n * num * 12)


def write(rows: list[dict], args: argparse.Namespace, context: dict) -> None:
    shape = gpu_common.ROOFLINE_SHAPE
    line = roofline(shape["n"], shape["d"], 128, "bfloat16")
    for row in rows:
        row.setdefault("roofline_32k_512_bf16_num128", line)
    report.write_report(
        rows,
        args.out,
        NAME,
        f"topk_hard_negatives, N = M, D = {args.dim}, on {context['device_name']}",
        columns=[
            ("provider", "provider"),
            ("dtype", "params.dtype"),
            ("N = M", "params.n"),
            *report.TIME_COLUMNS,
            *gpu_common.FLOOR_COLUMNS,
            ("peak MiB", "peak_mem_mib"),
            *gpu_common.STATUS_COLUMNS,
        ],
        x_key="n",
        notes=(
            f"mgccl_ops {context['version']}, torch {context['torch']}. Median of {args.repeats} runs after one "
            "warm-up; peak memory is torch.cuda.max_memory_allocated during one step minus the inputs (faiss's "
            "own temporary memory is not included). Every provider excludes each query's positive key. "
            + gpu_common.roofline_note("mining at N = M = 32k, D = 512, num = 128, bf16", line)
        ),
    )
