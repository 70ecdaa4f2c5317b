"""Runs test cases on every rank of a gloo process group spawned on this machine.

A test module defines ``CASES`` (name -> ``case(rank, world)``) and ``CASE_WORLDS`` (name ->
the world sizes it runs at), and calls :func:`run_case`. All cases of one module and world
size run in one spawn of ``world`` processes (the interpreter start is most of the cost).
"""

from __future__ import annotations

import datetime
import functools
import importlib
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, store: str, module: str, cases: list[str], out: str) -> None:
    """Runs each case on this rank and writes ``ok`` or its traceback to ``out/case.rank``."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    torch.set_num_threads(1)
    registry = importlib.import_module(module).CASES
    try:
        for case in cases:
            try:
                registry[case](rank, world)
                outcome = "ok"
            except Exception:
                outcome = traceback.format_exc()
            Path(out, f"{case}.{rank}").write_text(outcome)
    finally:
        dist.destroy_process_group()


@functools.cache
def _outcomes(module: str, world: int, folder: str) -> dict[str, list[str]]:
    """Every case of ``module`` that runs at ``world``: its outcome on each rank."""
    cases = [name for name, worlds in importlib.import_module(module).CASE_WORLDS.items() if world in worlds]
    mp.spawn(_worker, args=(world, f"{folder}/store", module, cases, folder), nprocs=world, join=True)
    return {case: [Path(folder, f"{case}.{rank}").read_text() for rank in range(world)] for case in cases}


def run_case(module: str, world: int, case: str, tmp_path_factory) -> None:
    """Fails with the rank's traceback unless ``case`` of ``module`` passed on every rank."""
    folder = str(tmp_path_factory.getbasetemp() / f"{module}-world{world}")
    os.makedirs(folder, exist_ok=True)
    for rank, outcome in enumerate(_outcomes(module, world, folder)[case]):
        assert outcome == "ok", f"rank {rank} of {world}:\n{outcome}"
