"""What the GPU benchmarks share: one case measured in this process, memory predictions that
skip providers that would not fit, a time budget, and the roofline of a kernel.

On CUDA the peak memory of a step is ``torch.cuda.max_memory_allocated`` during the step minus
what was allocated before it (the inputs), measured in the benchmark's own process: the caching
allocator's statistics count only live tensors, so earlier cases do not leak into it.
Allocations outside torch's allocator (faiss's temporary memory) are not seen; those rows say so.

The roofline rates are the H200's measured ones (DESIGN.md / issue 9): bf16 matrix products
about 790 TFLOP/s, memory about 4.3 TB/s. The time a kernel's FLOPs and bytes imply at those
rates is the floor its measured time is read against.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mgccl_ops.bench import harness

BF16_TENSOR_FLOPS = 790e12
MEMORY_BYTES_PER_S = 4.3e12
ROOFLINE_SHAPE = {"n": 32768, "m": 32768, "d": 512}
MEMORY_FRACTION = 0.8  # skip a provider whose predicted peak exceeds this share of the device


def roofline(flops: float, bytes_moved: float) -> dict:
    """The floor a kernel of ``flops`` and ``bytes_moved`` has at the H200 rates (milliseconds)."""
    compute_ms = flops / BF16_TENSOR_FLOPS * 1e3
    memory_ms = bytes_moved / MEMORY_BYTES_PER_S * 1e3
    return {
        "flops": flops,
        "bytes": bytes_moved,
        "compute_ms": compute_ms,
        "memory_ms": memory_ms,
        "floor_ms": max(compute_ms, memory_ms),
        "bound": "compute" if compute_ms >= memory_ms else "memory",
    }


def roofline_note(what: str, line: dict) -> str:
    """One Markdown line: the FLOPs and bytes of ``what`` and the time they imply."""
    return (
        f"Roofline of {what}: {line['flops'] / 1e12:.3g} TFLOP and {line['bytes'] / 1e9:.3g} GB, "
        f"{line['compute_ms']:.3g} ms at {BF16_TENSOR_FLOPS / 1e12:.0f} TFLOP/s (bf16 tensor cores) and "
        f"{line['memory_ms']:.3g} ms at {MEMORY_BYTES_PER_S / 1e12:.1f} TB/s: {line['bound']}-bound, "
        f"floor {line['floor_ms']:.3g} ms. float32 rows run IEEE float32 unless TF32 is allowed, "
        "about 12x below the bf16 rate, so their floor is about 12x higher."
    )


def device_memory_bytes(device: str) -> int:
    return torch.cuda.get_device_properties(torch.device(device)).total_memory


def fits(predicted_bytes: float, device: str) -> bool:
    return predicted_bytes <= MEMORY_FRACTION * device_memory_bytes(device)


def free_cached_memory() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def measure(factory: Callable[[], Callable[[], object]], device: str, *, repeats: int) -> dict:
    """Time (median/p20/p80 of ``repeats`` after one warm-up) and peak extra memory of one step.

    Returns ``{"time_ms": ..., "peak_mem_mib": ...}``, or ``{"error": ...}`` (out of memory, or
    the provider's error, e.g. a missing optional package).
    """
    step = None
    try:
        step = factory()
        timing = harness.time_step(step, device, warmup=1, repeats=repeats)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        return {"time_ms": timing, "peak_mem_mib": peak}
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory"}
    except (RuntimeError, ImportError, ValueError) as error:  # a provider that cannot run this case
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    finally:
        del step
        free_cached_memory()


class Budget:
    """Wall-clock budget of one benchmark run: cases past it are recorded as not run."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def spent(self) -> bool:
        return self.left() <= 0


class Sweep:
    """The cases of one GPU benchmark run: what they share, and one row per case (:meth:`row`)."""

    def __init__(self, bench: str, context: dict, args: argparse.Namespace, budget: Budget, size_key: str):
        """``args``: the benchmark's options (``device``, ``repeats``); ``size_key``: the params
        entry printed as the case's size."""
        self.bench, self.context, self.budget, self.size_key = bench, context, budget, size_key
        self.device, self.repeats = args.device, args.repeats

    def row(
        self,
        provider: str,
        params: dict,
        factory: Callable[[], Callable[[], object]],
        predicted_bytes: float,
        line: dict,
        *,
        unsupported: str | None = None,
        with_tflops: bool = False,
    ) -> dict:
        """One case's row. Not run once the budget is spent; skipped where ``unsupported`` (the
        reason) or where ``predicted_bytes`` would not fit; else measured (:func:`measure`) with
        the floor of its roofline ``line`` (and, ``with_tflops``, its rate of ``line["flops"]``)
        when it ran, and printed."""
        if self.budget.spent():
            return skipped_row(self.bench, provider, params, "not run: time budget spent", self.context)
        if unsupported:
            return skipped_row(self.bench, provider, params, unsupported, self.context)
        if not fits(predicted_bytes, self.device):
            return skipped_row(self.bench, provider, params, "skipped: would not fit", self.context)
        result = measure(factory, self.device, repeats=self.repeats)
        row = {"bench": self.bench, "provider": provider, "params": params, **result, **self.context}
        if "time_ms" in result:
            if with_tflops:
                row["tflops"] = line["flops"] / (result["time_ms"]["median"] * 1e9)
            row["floor_ms"] = line["floor_ms"]
            row["percent_of_floor"] = 100 * line["floor_ms"] / result["time_ms"]["median"]
        print_row(row, self.size_key)
        return row


def add_run_arguments(parser: argparse.ArgumentParser, time_budget: float) -> None:
    """The options every GPU benchmark ends with: --device, --repeats, --time-budget, --out."""
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--time-budget", type=float, default=time_budget, help="seconds for the whole run")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))


# Table columns of the GPU benchmarks: a row's roofline floor, and why a row has no time.
FLOOR_COLUMNS = (("roofline floor ms", "floor_ms"), ("% of floor", "percent_of_floor"))
STATUS_COLUMNS = (("not run", "skipped"), ("error", "error"))


def skipped_row(bench: str, provider: str, params: dict, reason: str, context: dict) -> dict:
    return {"bench": bench, "provider": provider, "params": params, "skipped": reason, **context}


def print_row(row: dict, size_key: str) -> None:
    size = row["params"].get(size_key)
    if "skipped" in row or "error" in row:
        print(f"{row['provider']:34s} {size_key}={size}  {row.get('skipped') or row.get('error')}", flush=True)
        return
    print(
        f"{row['provider']:34s} {size_key}={size}  {row['time_ms']['median']:10.2f} ms  "
        f"peak {row['peak_mem_mib']} MiB  {row.get('percent_of_floor', float('nan')):.1f}% of the roofline floor",
        flush=True,
    )
