"""Timing and peak-memory measurement of benchmark cases.

A case is a *setup factory*: a module-level function ``factory(**params) -> step`` that builds
the inputs and returns a zero-argument callable doing the measured work (e.g. forward +
backward). The same factory serves the speed and the memory measurement.

Peak memory is measured in a fresh subprocess so that nothing else lives in it: on CUDA,
``torch.cuda.max_memory_allocated`` over the step; on the CPU, the growth of the process's
resident set during the step (peak RSS, reset through ``/proc/self/clear_refs`` after setup,
minus the RSS before the step).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import mgccl_ops

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_step(step: Callable[[], object], device: str, *, warmup: int = 1, repeats: int = 5) -> dict:
    """Wall time of ``step`` in milliseconds: median, 20th and 80th percentiles of ``repeats`` runs."""
    for _ in range(warmup):
        step()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return timing_summary(samples)


def timing_summary(samples: list[float]) -> dict:
    """Median, 20th and 80th percentiles and count of wall times (ms)."""
    samples = sorted(samples)
    quantiles = statistics.quantiles(samples, n=5, method="inclusive") if len(samples) > 1 else samples * 4
    return {"median": statistics.median(samples), "p20": quantiles[0], "p80": quantiles[3], "runs": len(samples)}


def resolve(factory_path: str) -> Callable[..., Callable[[], object]]:
    """``"package.module:function"`` -> the function."""
    module_name, _, function_name = factory_path.partition(":")
    return getattr(importlib.import_module(module_name), function_name)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def step_peak_mib(step: Callable[[], object], device: str | torch.device) -> float:
    """Peak extra memory (MiB) of one call of ``step`` in this process: on CUDA the growth of
    ``torch.cuda.max_memory_allocated`` on ``device``, on the CPU the growth of the resident set."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets the peak resident set size (VmHWM) to the current one
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) / 1024


def measure_peak_here(factory_path: str, params: dict, device: str) -> float:
    """Peak extra memory (MiB) of one step, measured in this process (call it in a fresh one)."""
    return step_peak_mib(resolve(factory_path)(**params), device)


def peak_memory_mib(
    factory_path: str, params: dict, device: str, timeout_s: float = 1800, extra_env: dict[str, str] | None = None
) -> float | None:
    """Runs :func:`measure_peak_here` in a fresh Python process (with ``extra_env`` added to its
    environment); None if the step failed there."""
    command = [sys.executable, "-m", "mgccl_ops.bench.memory", factory_path, json.dumps(params), device]
    # Run outside the working directory, so that `-m` imports the installed package and not a
    # source checkout without its compiled module; keep PYTHONPATH entries valid there.
    env = os.environ.copy() | (extra_env or {})
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep))
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=tempfile.gettempdir()
    )
    if result.returncode != 0:
        print(f"peak memory of {factory_path}{params} failed:\n{result.stderr[-2000:]}", file=sys.stderr)
        return None
    return float(result.stdout.strip().splitlines()[-1])


def measure_case(
    bench: str,
    provider: str,
    factory_path: str,
    factory_params: dict,
    params: dict,
    context: dict,
    *,
    device: str,
    repeats: int,
    derived: Callable[[dict], dict] | None = None,
    peak: Callable[[dict], float | None] | None = None,
) -> dict:
    """One benchmark row: the step of ``factory_path(**factory_params)`` timed here
    (:func:`time_step`), then its peak memory in a fresh process (:func:`peak_memory_mib`, or
    ``peak(factory_params)`` where given).

    Returns ``{"bench", "provider", "params", "time_ms", **derived(time_ms), "peak_mem_mib",
    **context}`` in that order (``derived``: values computed from the timing, e.g. GFLOP/s).
    """
    step = resolve(factory_path)(**factory_params)
    timing = time_step(step, device, repeats=repeats)
    del step  # free its tensors before the memory measurement
    row = {"bench": bench, "provider": provider, "params": params, "time_ms": timing}
    row.update(derived(timing) if derived is not None else {})
    row["peak_mem_mib"] = (
        peak(factory_params) if peak is not None else peak_memory_mib(factory_path, factory_params, device)
    )
    row.update(context)
    return row


def add_output_arguments(parser: argparse.ArgumentParser, repeats: int = 3) -> None:
    """The options a benchmark ends with: --repeats (timed runs per case) and --out (the folder)."""
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))


def run_context(device: str) -> dict[str, str]:
    """What every benchmark row records about the run: device name, mgccl_ops and torch versions."""
    return {"device_name": device_name(device), "version": mgccl_ops.__version__, "torch": torch.__version__}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = "cpu"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"
