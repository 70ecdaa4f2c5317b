"""The bad-input sweep: every case of bad_input_cases.py must raise a clear error naming the op
or equal the reference; none may crash or hang.

The cases run in worker processes (bad_input_worker.py), many per process to keep the sweep
short. A worker that dies (a segfault, an abort from a sanitizer) fails the case it was running,
and a fresh worker carries on with the rest; a case that runs past CASE_TIMEOUT_S fails as hung.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading

import pytest
from bad_input_cases import CASES

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bad_input_worker.py")
CASE_TIMEOUT_S = 300


def run_cases(names: list[str]) -> dict[str, dict]:
    """Outcome of every case, restarting the worker after a crash or a hang."""
    results: dict[str, dict] = {}
    remaining = list(names)
    while remaining:
        worker = subprocess.Popen(
            [sys.executable, WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: queue.Queue = queue.Queue()

        def read_lines(stream=worker.stdout, lines=lines):
            for line in stream:
                lines.put(line)
            lines.put(None)  # the worker's stdout closed: it ended or died

        threading.Thread(target=read_lines, daemon=True).start()
        stderr_tail: list[str] = []
        threading.Thread(target=stderr_tail.extend, args=(worker.stderr,), daemon=True).start()
        worker.stdin.write("".join(name + "\n" for name in remaining))
        worker.stdin.close()
        running = None
        while True:
            try:
                line = lines.get(timeout=CASE_TIMEOUT_S)
            except queue.Empty:
                worker.kill()
                worker.wait()
                results[running or remaining[0]] = {"ok": False, "why": f"hung for {CASE_TIMEOUT_S} s"}
                break
            if line is None:
                break
            message = json.loads(line)
            if "start" in message:
                running = message["start"]
                continue
            results[message["case"]] = message
            running = None
        code = worker.wait()
        if running is not None and running not in results:
            tail = "".join(stderr_tail)[-3000:]
            results[running] = {"ok": False, "why": f"the process died (exit code {code}): {tail}"}
        remaining = [name for name in remaining if name not in results]
        if remaining and running is None and code == 0:
            # The worker ended cleanly without answering: report instead of looping.
            for name in remaining:
                results[name] = {"ok": False, "why": "the worker ended without running it"}
            remaining = []
    return results


@pytest.fixture(scope="module")
def sweep() -> dict[str, dict]:
    return run_cases(list(CASES))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, sweep):
    result = sweep[name]
    assert result["ok"], f"{name}: {result.get('why')}; raised {result.get('raised')}: {result.get('message')}"


def test_a_crashing_case_fails_alone():
    """The harness itself: a worker killed mid-case fails that case and the next still runs."""
    results = run_cases(["topk_hard_negatives-num-0", "_crash", "topk_hard_negatives-num-negative"])
    assert not results["_crash"]["ok"] and "died" in results["_crash"]["why"]
    assert results["topk_hard_negatives-num-0"]["ok"]
    assert results["topk_hard_negatives-num-negative"]["ok"]
