"""Race test of the shared union-find, hooking and packed pick (csrc/common/) on host threads.

The CUDA region kernels run these functions from thousands of threads; the Triton interpreter
and the CPU kernels run them one at a time, so neither could show a race. This builds
``tests_cpp/union_find_race_test.cpp`` with the host compiler and runs it: 2 to 16
``std::thread``s, random work splits and yields, many seeds, every result against the sequential
one. ``.ci/run`` also runs it under ThreadSanitizer.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests_cpp" / "union_find_race_test.cpp"
COMPILER = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.fixture(scope="module")
def race_test(tmp_path_factory) -> Path:
    if COMPILER is None:
        pytest.skip("no C++ compiler on this machine")
    binary = tmp_path_factory.mktemp("race") / "union_find_race_test"
    subprocess.run(
        [COMPILER, "-std=c++20", "-O2", "-pthread", f"-I{ROOT / 'csrc'}", str(SOURCE), "-o", str(binary)],
        check=True,
    )
    return binary


@pytest.mark.parametrize("nodes", [64, 2000])
def test_threads_agree_with_sequential(race_test, nodes):
    result = subprocess.run([str(race_test), "6", "16", str(nodes)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 mismatches" in result.stdout
    assert "24 runs" in result.stdout  # 4 thread counts (2, 4, 8, 16) x 6 seeds: all ran
