"""CPU region kernels before and after a change, timed in one interleaved run, side by side.

Usage: python bench/regions_before_after.py --before DIR [--rounds 5] [--out bench/results]
DIR holds a copy of the ``mgccl_ops`` package whose ``_C`` module was built from the commit
before the change (the Python layer of the region ops being the same). Each round times every
configuration once with the "before" build and once with this checkout's, each in a fresh
subprocess (alternating, so drift in the shared machine's load hits both alike); the table gives
the median over rounds of each subprocess's median of ``--repeats`` runs, and checks that both
builds return the same labels. Inputs are those of ``mgccl_ops.bench.regions`` (B = 8, C = 64).
Also times ``contrastive_loss`` forward + backward (N = M = 2048, D = 256, float32), whose CPU
kernel moved onto the shared driver in the same change. Writes ``regions_before_after.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = [
    *[("region_merge", linkage, size) for size in (64, 128, 256) for linkage in ("single", "average")],
    *[("region_merge auto", linkage, 256) for linkage in ("single", "average")],
    ("region_auto_threshold", "-", 256),
    ("contrastive_loss fwd+bwd", "mean", 2048),
    ("contrastive_loss fwd+bwd", "symmetric", 2048),
]

WORKER = r"""
import hashlib, json, sys, time, statistics, torch
import mgccl_ops
from mgccl_ops.bench.regions import images
configs, repeats = json.loads(sys.argv[1]), int(sys.argv[2])
out = []
for op, variant, size in configs:
    if op.startswith("contrastive"):
        g = torch.Generator().manual_seed(0)
        q = torch.nn.functional.normalize(torch.randn(size, 256, generator=g), dim=1).requires_grad_()
        k = torch.nn.functional.normalize(torch.randn(size, 256, generator=g), dim=1).requires_grad_()
        pos = torch.randperm(size, generator=g)
        def step():
            loss = mgccl_ops.contrastive_loss(q, k, pos, 10.0, symmetric=variant == "symmetric")
            loss.backward()
            return loss.detach()
    else:
        feat, _, thresholds = images(8, 64, size)
        thr = "auto" if op.endswith("auto") else torch.tensor(thresholds, dtype=torch.float64)
        if op == "region_auto_threshold":
            step = lambda: mgccl_ops.region_auto_threshold(feat)
        else:
            step = lambda: mgccl_ops.region_merge(feat, thr, linkage=variant)[0]
    result = step()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        samples.append((time.perf_counter() - start) * 1e3)
    digest = hashlib.sha1(result.detach().numpy().tobytes()).hexdigest()[:12]
    out.append({"median_ms": statistics.median(samples), "digest": digest})
print(json.dumps(out))
"""


def run_build(package_dir: Path, repeats: int) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(package_dir)}
    done = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(CONFIGS), str(repeats)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=package_dir,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    samples = {"before": [], "after": []}
    for _ in range(args.rounds):
        samples["before"].append(run_build(args.before.resolve(), args.repeats))
        samples["after"].append(run_build(ROOT, args.repeats))
    rows = []
    for i, (op, variant, size) in enumerate(CONFIGS):
        before = statistics.median(r[i]["median_ms"] for r in samples["before"])
        after = statistics.median(r[i]["median_ms"] for r in samples["after"])
        same = samples["before"][0][i]["digest"] == samples["after"][0][i]["digest"]
        rows.append(
            {"op": op, "variant": variant, "size": size, "before_ms": before, "after_ms": after, "same_output": same}
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "regions_before_after.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "| op | linkage / variant | size | before ms | after ms | after / before | same output |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['variant']} | {r['size']} | {r['before_ms']:.2f} | {r['after_ms']:.2f} | "
            f"{r['after_ms'] / r['before_ms']:.2f} | {'yes' if r['same_output'] else 'no'} |"
        )
    notes = (
        f"{args.rounds} interleaved rounds (before, after), each a fresh subprocess timing every row "
        f"{args.repeats} times after one warm-up; medians. Region rows: B = 8, C = 64, the inputs of the region "
        "benchmark (size = H = W); contrastive rows: N = M = size, D = 256, float32. 'same output': the labels "
        "(thresholds, loss) of both builds hash equal. Load average (1 min) at the start and the end: "
        f"{load:.1f}, {os.getloadavg()[0]:.1f}."
    )
    (args.out / "regions_before_after.md").write_text(
        "# CPU kernels before / after the csrc/common port\n\n" + notes + "\n\n" + "\n".join(lines) + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
