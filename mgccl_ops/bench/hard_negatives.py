"""Benchmark of ``topk_hard_negatives``: time and peak memory against torch.mm + torch.topk and faiss.

Every provider returns, for each of N queries, the ``num`` most similar of M keys other than
the query's positive (key i for query i, as in a batch of pairs):

- ``mgccl``: ``topk_hard_negatives(q, k, num, pos=arange(N))``, the positive excluded inside
  the selection, never holding the N x M similarities.
- ``torch.mm + topk``: the N x M similarities, the positive set to -inf, ``torch.topk``.
- ``faiss``: ``IndexFlatIP`` over the keys (built inside the step, since a training step
  mines a fresh key bank), searched for ``num + 1`` candidates (one more than asked, since
  faiss cannot exclude a key per query), then the positive dropped from each row.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

import mgccl_ops
from mgccl_ops.bench import harness, report

NAME = "hard_negatives"
PROVIDERS = ("mgccl", "torch.mm + topk", "faiss")


def _features(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=1)
    k = torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=1)
    return q, k


def mm_topk_step(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, num: int) -> Callable[[], object]:
    """The ``torch.mm + topk`` provider's step: the [N, M] similarities, each row's positive set
    to -inf, ``torch.topk`` of ``num``."""

    def mm_topk():
        sim = q @ k.T
        sim.scatter_(1, pos[:, None], float("-inf"))
        return torch.topk(sim, num, dim=1)

    return mm_topk


def drop_positive(idx: torch.Tensor, sim: torch.Tensor, pos: torch.Tensor, num: int) -> tuple[torch.Tensor, ...]:
    """faiss's ``num + 1`` results per row (idx, sim [N, num + 1]) without the row's positive:
    the first ``num`` others, in order."""
    keep = torch.sort((idx != pos[:, None]).to(torch.int8), dim=1, descending=True, stable=True)
    order = keep.indices[:, :num]
    return idx.gather(1, order), sim.gather(1, order)


def mining_step(provider: str, n: int, d: int, num: int, device: str = "cpu") -> Callable[[], object]:
    """Setup factory: N = M queries and keys [n, d] (float32, on ``device``); the step mines ``num``
    per row. faiss runs on the CPU only here (``gpu_mining`` has faiss-gpu)."""
    q, k = (t.to(device) for t in _features(n, d))
    pos = torch.arange(n, device=device)
    if provider == "mgccl":
        return lambda: mgccl_ops.topk_hard_negatives(q, k, num, pos=pos)
    if provider == "torch.mm + topk":
        return mm_topk_step(q, k, pos, num)
    if provider == "faiss":
        if device != "cpu":
            raise ValueError("the faiss provider runs on the CPU; faiss-gpu is in the gpu_mining benchmark")
        import faiss

        q_np, k_np = q.numpy(), k.numpy()

        def faiss_search():
            index = faiss.IndexFlatIP(d)
            index.add(k_np)
            sim, idx = (torch.from_numpy(a) for a in index.search(q_np, num + 1))
            return drop_positive(idx, sim, pos, num)

        return faiss_search
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--nums", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument(
        "--max-matrix-gib",
        type=float,
        default=8.0,
        help="skip torch.mm + topk where its N x M float32 similarities exceed this",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (faiss only on the CPU)")
    harness.add_output_arguments(parser)


def run(args: argparse.Namespace) -> list[dict]:
    context = harness.run_context(args.device)
    factory = "mgccl_ops.bench.hard_negatives:mining_step"
    rows = []
    for num in args.nums:
        for n in args.sizes:
            for provider in args.providers:
                name = f"{provider} (num={num})"
                if provider == "torch.mm + topk" and n * n * 4 / 2**30 > args.max_matrix_gib:
                    print(f"{name:28s} n={n:6d}  skipped: the N x M matrix needs {n * n * 4 / 2**30:.0f} GiB")
                    continue
                if provider == "faiss" and args.device != "cpu":
                    continue
                params = {"provider": provider, "n": n, "d": args.dim, "num": num, "device": args.device}
                row_params = {"n": n, "d": args.dim, "num": num}
                row = harness.measure_case(
                    NAME, name, factory, params, row_params, context, device=args.device, repeats=args.repeats
                )
                rows.append(row)
                timing = row["time_ms"]
                print(
                    f"{name:28s} n={n:6d}  {timing['median']:10.1f} ms "
                    f"(p20 {timing['p20']:.1f}, p80 {timing['p80']:.1f})  peak {row['peak_mem_mib']} MiB",
                    flush=True,
                )
    _add_ratios(rows)
    report.write_report(
        rows,
        args.out,
        NAME,
        f"topk_hard_negatives, N = M, D = {args.dim}, float32, {context['device_name']}",
        columns=[
            ("provider", "provider"),
            ("N = M", "params.n"),
            *report.TIME_COLUMNS,
            ("time / faiss", "time_vs_faiss"),
            ("peak MiB", "peak_mem_mib"),
            ("mm+topk peak / peak", "memory_saving"),
        ],
        x_key="n",
        notes=(
            f"mgccl_ops {context['version']}, torch {context['torch']}. Median of {args.repeats} runs after "
            "one warm-up; peak memory is the growth of the process's resident set during one step, in a "
            "fresh process (inputs excluded). Every provider excludes each query's positive key: mgccl "
            "inside the selection, torch.mm + topk by setting it to -inf, faiss by searching num + 1 "
            "candidates and dropping the positive (the faiss step includes building the IndexFlatIP). "
            f"torch.mm + topk is skipped where its N x M matrix exceeds {args.max_matrix_gib:g} GiB."
        ),
    )
    return rows


def _add_ratios(rows: list[dict]) -> None:
    """Time relative to faiss and memory saving relative to torch.mm + topk, same N and num."""
    by_key = {(row["provider"], row["params"]["n"]): row for row in rows}
    for row in rows:
        n, num = row["params"]["n"], row["params"]["num"]
        faiss_row = by_key.get((f"faiss (num={num})", n))
        mm_row = by_key.get((f"torch.mm + topk (num={num})", n))
        report.add_ratios(row, faiss_row, "time_vs_faiss", mm_row)
