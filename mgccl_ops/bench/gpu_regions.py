"""GPU benchmark of the region ops: ``region_merge`` on CUDA against the CPU kernel and CuPy.

``python -m mgccl_ops.bench gpu_regions --device cuda [--out DIR] [--time-budget S]`` (needs a CUDA
device; run by ``bench/gpu_check.sh``). Sizes are run in order until the time budget is spent. Inputs are those of
the CPU region benchmark (``regions``: generated piecewise-constant images with noise), merged
with their precomputed ``threshold="auto"`` thresholds; the "auto" rows compute them inside.

Providers, per linkage and size:
- ``mgccl cuda``: ``region_merge`` on CUDA tensors (labels checked bitwise against the CPU
  kernel's: column ``labels == cpu``).
- ``mgccl cpu``: the CPU kernel on the same batch (all host threads).
- ``cupy ndimage.label`` (single linkage rows, when CuPy imports): ``cupyx.scipy.ndimage.label``
  of a binary image of the same size (the pixels whose right-neighbour similarity passes the
  threshold). It labels a different, simpler graph (connectivity by pixel value, not by edge), so
  it is a lower bound on the cost of GPU connected components at this size, not the same
  partition.
- ``region_pool`` rows: ``region_pool`` + backward of the pooled mean on CUDA vs the CPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import mgccl_ops
from mgccl_ops.bench import harness, report
from mgccl_ops.bench.regions import images

NAME = "gpu_regions"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu-max-size", type=int, default=256, help="largest size the CPU kernel is timed at")
    parser.add_argument("--device", default="cuda", help="a CUDA device")
    parser.add_argument("--time-budget", type=float, default=150.0, help="seconds; no new size starts after it")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))


def cupy_label_step(feat: torch.Tensor, thresholds: torch.Tensor):
    """cupyx.scipy.ndimage.label of the right-neighbour mask of every image, or None without CuPy."""
    try:
        import cupy
        from cupyx.scipy import ndimage
    except ImportError:
        return None
    unit = torch.nn.functional.normalize(feat.float(), dim=1)
    right = (unit[..., :-1] * unit[..., 1:]).sum(1)
    mask = torch.nn.functional.pad(right, (0, 1)) >= thresholds.view(-1, 1, 1).to(right.dtype)
    masks = [cupy.asarray(m) for m in mask]

    def step():
        return [ndimage.label(m)[0] for m in masks]

    return step


def merge_rows(size: int, args: argparse.Namespace, context: dict) -> list[dict]:
    """The region_merge rows of one image size, and the region_pool row."""
    rows = []
    params = {"size": size, "batch": args.batch, "channels": args.channels}
    feat_cpu, _, thresholds = images(args.batch, args.channels, size)
    thr_cpu = torch.tensor(thresholds, dtype=torch.float64)
    feat, thr = feat_cpu.cuda(), thr_cpu.cuda()
    for linkage in ("single", "average"):
        cpu_labels, cpu_num = mgccl_ops.region_merge(feat_cpu, thr_cpu, linkage=linkage)
        cuda_labels, cuda_num = mgccl_ops.region_merge(feat, thr, linkage=linkage)
        same = bool(torch.equal(cuda_labels.cpu(), cpu_labels) and torch.equal(cuda_num.cpu(), cpu_num))
        steps = {
            "mgccl cuda": ("cuda", lambda linkage=linkage: mgccl_ops.region_merge(feat, thr, linkage=linkage)),
            "mgccl cuda, auto": ("cuda", lambda linkage=linkage: mgccl_ops.region_merge(feat, "auto", linkage=linkage)),
        }
        if size <= args.cpu_max_size:
            steps["mgccl cpu"] = (
                "cpu",
                lambda linkage=linkage: mgccl_ops.region_merge(feat_cpu, thr_cpu, linkage=linkage),
            )
        if linkage == "single":
            cupy_step = cupy_label_step(feat, thr)
            if cupy_step is not None:
                steps["cupy ndimage.label"] = ("cuda", cupy_step)
        for provider, (device, step) in steps.items():
            row = {"bench": NAME, "provider": provider, "params": {"op": f"region_merge ({linkage})", **params}}
            row.update(context)
            row["time_ms"] = harness.time_step(step, device, repeats=args.repeats)
            row["labels_equal_cpu"] = same if provider.startswith("mgccl cuda") else None
            row["regions"] = float(cpu_num.double().mean())
            rows.append(row)
            print(f"{linkage:8s} {provider:20s} {size:4d} {row['time_ms']['median']:.3f} ms", flush=True)
    labels, num = mgccl_ops.region_merge(feat, thr, linkage="average")
    x = feat.detach().requires_grad_(True)

    def pool_step():
        mgccl_ops.region_pool(x, labels, num).sum().backward()

    row = {"bench": NAME, "provider": "mgccl cuda", "params": {"op": "region_pool + backward", **params}}
    row.update(context)
    row["time_ms"] = harness.time_step(pool_step, "cuda", repeats=args.repeats)
    rows.append(row)
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_regions: no CUDA device")
    if not str(args.device).startswith("cuda"):
        raise SystemExit(f"gpu_regions: --device should be a CUDA device, got {args.device!r}")
    torch.cuda.set_device(torch.device(args.device))
    context = harness.run_context(args.device)
    deadline = time.monotonic() + args.time_budget
    rows = []
    for size in args.sizes:
        if time.monotonic() > deadline:
            print(f"time budget spent: size {size} and larger skipped", flush=True)
            break
        rows += merge_rows(size, args, context)
    report.write_report(
        rows,
        args.out,
        NAME,
        f"region ops on {context['device_name']}, B = {args.batch}, C = {args.channels}",
        columns=[
            ("op", "params.op"),
            ("provider", "provider"),
            ("H = W", "params.size"),
            ("time ms (median)", "time_ms.median"),
            ("p20", "time_ms.p20"),
            ("p80", "time_ms.p80"),
            ("labels == cpu", "labels_equal_cpu"),
            ("regions / image", "regions"),
        ],
        x_key="size",
        panels=[("time for the batch (ms)", "time_ms.median")],
        notes=(
            f"mgccl_ops {context['version']}, torch {context['torch']}. Inputs of the CPU region benchmark; "
            f"median (p20, p80) of {args.repeats} runs after one warm-up. cupy ndimage.label labels a binary mask "
            "of the same size (a different, simpler graph): a lower bound, not the same partition."
        ),
    )
    return rows
