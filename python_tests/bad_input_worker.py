"""Runs bad-input sweep cases (bad_input_cases.py) in this process and reports each as a JSON
line on stdout: ``{"start": name}`` before a case runs, then its outcome. The parent
(test_bad_input_sweep.py) reads the case names from this process's stdin, one per line, and
knows from a "start" without an outcome which case took the process down."""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bad_input_cases import CASES, CRASH_CASE  # noqa: E402
from compare import TOLERANCES  # noqa: E402

import mgccl_ops  # noqa: E402
from mgccl_ops import reference  # noqa: E402

CLEAR_ERRORS = (ValueError, RuntimeError, TypeError)


def compare(actual: tuple, expected: tuple, nonfinite: bool, tolerance: torch.dtype | None) -> str | None:
    """None when the op's outputs equal the reference's (floating outputs within the tolerance
    of the lowest precision among them, NaN equal to NaN), else what differs. With
    ``nonfinite``, gradients (the outputs that do not require grad themselves) are compared
    only where both are finite."""
    if len(actual) != len(expected):
        return f"{len(actual)} outputs against the reference's {len(expected)}"
    floating = [t.dtype for t in actual if t.is_floating_point()] + ([tolerance] if tolerance else [])
    dtype = max(floating, key=lambda d: TOLERANCES[d][1], default=torch.float64)
    atol, rtol = TOLERANCES[dtype]
    for index, (a, e) in enumerate(zip(actual, expected)):
        if a.shape != e.shape or a.dtype != e.dtype:
            return f"output {index}: {a.dtype}{tuple(a.shape)} against the reference's {e.dtype}{tuple(e.shape)}"
        if a.is_floating_point():
            a64, e64 = a.detach().double(), e.detach().double()
            close = torch.isclose(a64, e64, atol=atol, rtol=rtol, equal_nan=True)
            if nonfinite and not a.requires_grad:
                close |= ~(a64.isfinite() & e64.isfinite())
            if not bool(close.all()):
                where = (~close).nonzero()[:3].tolist()
                return f"output {index}: {int((~close).sum())} elements differ, first at {where}"
        elif not torch.equal(a, e):
            return f"output {index}: integer outputs differ: {a.flatten()[:8].tolist()} != {e.flatten()[:8].tolist()}"
    return None


def outcome(name: str) -> dict:
    case = CRASH_CASE if name == "_crash" else CASES[name]
    try:
        actual = case.run(mgccl_ops)
    except CLEAR_ERRORS as error:
        message = str(error)
        ok = case.op in message.splitlines()[0] if message else False
        why = None if ok else f"the message does not name {case.op}"
        return {"ok": ok, "raised": type(error).__name__, "message": message[:1500], "why": why}
    except Exception as error:  # noqa: BLE001 (any other type is the failure being reported)
        return {"ok": False, "raised": type(error).__name__, "message": str(error)[:1500], "why": "unclear error type"}
    if case.must_raise:
        return {"ok": False, "why": "a malformed call returned without an error"}
    if all(t.device.type == "meta" for t in actual):
        # The fake impl answered. The references are not run on meta inputs: some build CPU
        # tensors of the inputs' sizes, which for the past-int32 cases would fill the memory.
        return {"ok": True, "why": None, "note": "meta outputs from the fake impl"}
    try:
        expected = case.run(reference)
    except Exception as error:  # noqa: BLE001
        return {"ok": False, "why": f"the op returned but the reference raised {type(error).__name__}: {error}"}
    difference = compare(actual, expected, case.nonfinite, case.tolerance)
    return {"ok": difference is None, "why": difference, "equal_reference": difference is None}


def main() -> None:
    torch.set_num_threads(int(os.environ.get("MGCCL_SWEEP_THREADS", "2")))
    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        print(json.dumps({"start": name}), flush=True)
        result = outcome(name)
        result["case"] = name
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
