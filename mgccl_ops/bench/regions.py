"""Benchmark of ``region_merge`` against scipy (single linkage) and scikit-image (average linkage).

Inputs: B generated piecewise-constant images with noise (``synthetic_regions``: 32 Voronoi
cells, noise of norm 0.5, cell features of pairwise cosine 0.5), C-dim features. Every
provider merges with the same per-image thresholds, those of ``threshold="auto"``, computed
before the timing.

Providers:
- ``mgccl (single)`` / ``mgccl (average)``: ``mgccl_ops.region_merge`` on the whole batch with
  the precomputed thresholds; ``mgccl, auto (...)``: the same with ``threshold="auto"``, its
  time including the thresholds.
- ``scipy``: per image, the thresholded 4-neighbour graph built with numpy (normalise,
  neighbour cosines, mask, COO matrix) and ``scipy.sparse.csgraph.connected_components``.
- ``skimage``: per image, ``skimage.graph.RAG`` on one-pixel regions with the normalised
  features as node data, then ``graph.merge_hierarchical`` with weight 1 - cosine of the
  regions' feature sums and thresh 1 - threshold (greedy, one pair at a time). It grows about
  quadratically, so it runs image by image under a time budget; where the budget ends first,
  the batch time is extrapolated from the images it finished and the row says so.

Partition agreement is the adjusted Rand index (ARI) against ours and against the true cells.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import torch

import mgccl_ops
from mgccl_ops.bench import harness, report
from mgccl_ops.bench.synthetic_regions import adjusted_rand_index, piecewise_constant_images

NAME = "regions"
SEGMENTS, NOISE, CORRELATION = 32, 0.5, 0.5


def images(batch: int, channels: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """(feat [B, C, S, S], truth [B, S, S], the per-image "auto" thresholds)."""
    feat, truth = piecewise_constant_images(
        batch, channels, size, size, segments=SEGMENTS, noise=NOISE, correlation=CORRELATION, seed=seed
    )
    return feat, truth, mgccl_ops.region_auto_threshold(feat).tolist()


def unit_pixels(image: torch.Tensor) -> np.ndarray:
    """One image [C, H, W] -> L2-normalised float64 features [H, W, C]."""
    x = image.permute(1, 2, 0).double().numpy()
    norm = np.linalg.norm(x, axis=2, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def scipy_single_linkage(image: torch.Tensor, threshold: float) -> np.ndarray:
    """Connected components [H, W] of the 4-neighbour graph with cosine >= threshold."""
    unit = unit_pixels(image)
    height, width, _ = unit.shape
    index = np.arange(height * width).reshape(height, width)
    right = (unit[:, :-1] * unit[:, 1:]).sum(2)
    down = (unit[:-1] * unit[1:]).sum(2)
    keep_right, keep_down = right >= threshold, down >= threshold
    src = np.concatenate([index[:, :-1][keep_right], index[:-1][keep_down]])
    dst = np.concatenate([index[:, 1:][keep_right], index[1:][keep_down]])
    graph = scipy.sparse.coo_matrix((np.ones(src.size, dtype=np.int8), (src, dst)), shape=(index.size,) * 2)
    return scipy.sparse.csgraph.connected_components(graph, directed=False)[1].reshape(height, width)


def skimage_average_linkage(image: torch.Tensor, threshold: float) -> np.ndarray:
    """scikit-image's RAG + hierarchical merging of one image on its C-dim features -> [H, W]."""
    from skimage import graph

    unit = unit_pixels(image)
    height, width, channels = unit.shape
    pixels = np.arange(height * width).reshape(height, width)
    rag = graph.RAG(pixels, connectivity=1)
    rows = unit.reshape(-1, channels)
    for node in rag.nodes:
        rag.nodes[node].update(labels=[node], total=rows[node].copy())

    def distance(a: np.ndarray, b: np.ndarray) -> float:
        denominator = np.linalg.norm(a) * np.linalg.norm(b)
        return 1.0 - (float(a @ b) / denominator if denominator > 0 else 0.0)

    for u, v, data in rag.edges(data=True):
        data["weight"] = distance(rag.nodes[u]["total"], rag.nodes[v]["total"])

    def merge(g, src, dst):
        g.nodes[dst]["total"] += g.nodes[src]["total"]

    def weight(g, src, dst, neighbour):
        return {"weight": distance(g.nodes[dst]["total"], g.nodes[neighbour]["total"])}

    return graph.merge_hierarchical(
        pixels, rag, thresh=1.0 - threshold, rag_copy=False, in_place_merge=True, merge_func=merge, weight_func=weight
    )


def merge_step(provider: str, linkage: str, size: int, batch: int, channels: int) -> Callable[[], list]:
    """Setup factory: one merge of the batch by ``provider`` -> the B label maps.

    "mgccl" merges with the precomputed thresholds, like the peers; "mgccl, auto" computes
    them itself (threshold="auto"); "scipy" is single linkage only.
    """
    feat, _, thresholds = images(batch, channels, size)
    if provider == "scipy":
        return lambda: [scipy_single_linkage(feat[b], thresholds[b]) for b in range(batch)]
    threshold = "auto" if provider == "mgccl, auto" else torch.tensor(thresholds, dtype=torch.float64)
    return lambda: list(mgccl_ops.region_merge(feat, threshold, linkage=linkage)[0].numpy())


class BudgetExceededError(Exception):
    pass


def run_bounded(fn: Callable[[], object], seconds: float) -> object:
    """fn(), or BudgetExceededError once ``seconds`` of wall time have passed (SIGALRM; main thread only)."""

    def expire(signum, frame):
        raise BudgetExceededError

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def agreement(partitions: list, ours: list, truth: torch.Tensor) -> dict:
    """Mean ARI of B label maps against ours and against the true cells, and regions per image."""
    return {
        "ari_vs_mgccl": float(np.mean([adjusted_rand_index(p, ours[b]) for b, p in enumerate(partitions)])),
        "ari_vs_truth": float(np.mean([adjusted_rand_index(p, truth[b]) for b, p in enumerate(partitions)])),
        "regions": float(np.mean([np.unique(p).size for p in partitions])),
    }


def skimage_row(size: int, batch: int, channels: int, budget_s: float, ours: list[np.ndarray]) -> dict:
    """Times skimage image by image within ``budget_s``; extrapolates to the batch if cut short."""
    feat, truth, thresholds = images(batch, channels, size)
    seconds, partitions = [], []
    deadline = time.perf_counter() + budget_s
    for b in range(batch):
        start = time.perf_counter()
        try:
            merged = run_bounded(lambda b=b: skimage_average_linkage(feat[b], thresholds[b]), deadline - start)
        except BudgetExceededError:
            break
        seconds.append(time.perf_counter() - start)
        partitions.append(merged)
    row: dict = {"images_timed": len(seconds)}
    if seconds:
        row["time_ms"] = {"median": float(np.mean(seconds)) * batch * 1e3, "p20": None, "p80": None, "runs": 1}
        row.update(agreement(partitions, ours, truth))
    if len(seconds) < batch:
        done = f"{len(seconds)} of {batch} images" if seconds else "no image"
        row["note"] = f"gave up at the {budget_s:.0f} s budget after {done}" + (
            f"; batch time extrapolated from {np.mean(seconds):.1f} s per image" if seconds else ""
        )
    else:
        row["note"] = f"{np.mean(seconds):.2f} s per image"
    return row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skimage-budget", type=float, default=150.0, help="seconds per size for scikit-image")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))


def run(args: argparse.Namespace) -> list[dict]:
    context = harness.run_context("cpu")
    rows = []
    load = os.getloadavg()
    skimage_budget_left = True
    for size in args.sizes:
        common = {"size": size, "batch": args.batch, "channels": args.channels}
        _, truth, _ = images(args.batch, args.channels, size)
        for linkage, peer in (("single", "scipy"), ("average", "skimage")):
            ours = merge_step("mgccl", linkage, **common)()
            providers = ["mgccl", "mgccl, auto"] + ([peer] if peer == "scipy" or skimage_budget_left else [])
            for provider in providers:
                name = f"{provider} ({linkage})" if provider.startswith("mgccl") else provider
                row = {"bench": NAME, "provider": name, "params": {"linkage": linkage, **common}, **context}
                if provider == "skimage":
                    row.update(skimage_row(size, args.batch, args.channels, args.skimage_budget, ours))
                    skimage_budget_left = row["images_timed"] > 0
                else:
                    params = {"provider": provider, "linkage": linkage, **common}
                    step = merge_step(**params)
                    row["time_ms"] = harness.time_step(step, "cpu", repeats=args.repeats)
                    row.update(agreement(step(), ours, truth))
                rows.append(row)
                timing = row.get("time_ms", {}).get("median")
                shown = "—" if timing is None else f"{timing:.1f}"
                print(f"{name:22s} {size:4d}  {shown} ms  {row.get('note', '')}", flush=True)
    _add_speedups(rows)
    report.write_report(
        rows,
        args.out,
        NAME,
        f"region_merge, B = {args.batch}, C = {args.channels}, {context['device_name']}",
        columns=[
            ("linkage", "params.linkage"),
            ("provider", "provider"),
            ("H = W", "params.size"),
            ("time ms (median)", "time_ms.median"),
            ("p20", "time_ms.p20"),
            ("p80", "time_ms.p80"),
            ("time / mgccl", "time_vs_mgccl"),
            ("ARI vs mgccl", "ari_vs_mgccl"),
            ("ARI vs truth", "ari_vs_truth"),
            ("regions / image", "regions"),
            ("note", "note"),
        ],
        x_key="size",
        panels=[("time for the batch (ms)", "time_ms.median")],
        notes=(
            f"mgccl_ops {context['version']}, torch {context['torch']}. Generated piecewise-constant images "
            f"({SEGMENTS} Voronoi cells, noise {NOISE}, cell cosine {CORRELATION}); every provider merges with the "
            "thresholds of threshold=\"auto\", precomputed (the 'auto' rows compute them inside); 4-connectivity. "
            f"mgccl and scipy: median (p20, p80) of {args.repeats} runs after one warm-up; scipy's time includes "
            "building its graph with numpy. skimage: one run per image, RAG construction included,"
            f" at most {args.skimage_budget:.0f} s per size (beyond it the batch time is extrapolated, see "
            "note; sizes after one where it finished no image are skipped). ARI: adjusted Rand index, mean over "
            f"images. Load average of this shared machine (1 min) at the start and the end: {load[0]:.1f}, "
            f"{os.getloadavg()[0]:.1f}."
        ),
    )
    return rows


def _add_speedups(rows: list[dict]) -> None:
    """time_vs_mgccl: each row's time over ours for the same linkage and size."""
    ours = {
        (r["params"]["linkage"], r["params"]["size"]): r
        for r in rows
        if r["provider"] == f"mgccl ({r['params']['linkage']})"
    }
    for row in rows:
        base = ours.get((row["params"]["linkage"], row["params"]["size"]))
        if base is not None and "time_ms" in row:
            row["time_vs_mgccl"] = row["time_ms"]["median"] / base["time_ms"]["median"]
