"""Compiles every CUDA kernel (csrc/cuda/*.cu) for sm_80 and sm_90 with ``-Xptxas -v`` and fails on
register spills.

Usage: python scripts/check_cuda_spills.py [--archs 80 90] [--python PY]. Each file is compiled
alone by scripts/nvcc_one.sh (the flags of the CMake build); ptxas reports, per kernel and
architecture, "N bytes spill stores, M bytes spill loads". Exit status 1 when any kernel spills
(or a compile fails), with a table of the offenders; 0 otherwise, with a one-line summary.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def spills(ptxas_output: str) -> list[tuple[str, str, int, int]]:
    """(kernel, arch, spill store bytes, spill load bytes) of every kernel in ptxas -v output."""
    found, current = [], None
    for line in ptxas_output.splitlines():
        entry = ENTRY.search(line)
        if entry:
            current = entry.groups()
            continue
        spill = SPILLS.search(line)
        if spill and current is not None:
            found.append((*current, int(spill.group(1)), int(spill.group(2))))
            current = None
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["80", "90"])
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    env = {**os.environ, "PYTHON": args.python, "MGCCL_CUDA_ARCHS": ";".join(args.archs)}
    kernels, bad = 0, []
    for source in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        with tempfile.TemporaryDirectory() as tmp:
            result = subprocess.run(
                ["bash", str(ROOT / "scripts" / "nvcc_one.sh"), str(source), str(Path(tmp) / "k.o"), "-Xptxas", "-v"],
                capture_output=True,
                text=True,
                env=env,
            )
        if result.returncode != 0:
            print(result.stdout + result.stderr, file=sys.stderr)
            print(f"{source.name}: nvcc failed", file=sys.stderr)
            return 1
        rows = spills(result.stdout + result.stderr)
        archs = {arch for _, arch, _, _ in rows}
        if archs != {f"sm_{a}" for a in args.archs}:
            print(f"{source.name}: ptxas reported archs {sorted(archs)}, expected {args.archs}", file=sys.stderr)
            return 1
        kernels += len(rows)
        bad += [(source.name, *row) for row in rows if row[2] or row[3]]
        print(f"{source.name}: {len(rows)} kernel builds, {sum(1 for r in rows if r[2] or r[3])} with spills")
    if bad:
        for name, kernel, arch, stores, loads in bad:
            print(f"SPILL {name} {arch} {kernel}: {stores} B stores, {loads} B loads", file=sys.stderr)
        return 1
    print(f"no spills in {kernels} kernel builds (archs {', '.join(args.archs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
