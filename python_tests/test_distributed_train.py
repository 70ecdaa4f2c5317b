"""`mgccl train` under torchrun: 2 ranks (gloo) write one checkpoint and one log that record
the world size, and --resume continues the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ENTRY = "import sys\nfrom mgccl_ops.cli import main\nsys.exit(main())\n"


def _torchrun(tmp_path: Path, *args: str) -> None:
    script = tmp_path / "mgccl_entry.py"
    script.write_text(ENTRY)
    # The ranks import mgccl_ops as this process does (the installed package, or the checkout when
    # PYTHONPATH says so), from outside the checkout: `-m` would put the uncompiled sources first.
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    done = subprocess.run(
        [*command, "train", *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_two_rank_training_writes_one_checkpoint_and_log_and_resumes(tmp_path):
    run = tmp_path / "run"
    common = ["--out-dir", str(run), "--no-progress"]
    _torchrun(tmp_path, "--steps", "3", "--batch-size", "3", "--image-size", "32", "--accum-steps", "2", *common)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "log.jsonl"]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3]
    assert records[0]["world_size"] == 2 and records[0]["accum_steps"] == 2
    assert len(records[0]["peak_memory_mib_per_rank"]) == 2
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["step"] == 3 and state["world_size"] == 2 and len(state["rng_per_rank"]) == 2
    first_weights = {k: v.clone() for k, v in state["model"].items()}

    # The resumed steps run the object-level loss in ring mode (the same gradients as gather).
    _torchrun(tmp_path, "--resume", "--steps", "4", "--distributed-mode", "ring", *common)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 4]
    assert all(r["world_size"] == 2 for r in records)
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["step"] == 4 and state["config"]["accum_steps"] == 2
    assert state["config"]["distributed_mode"] == "ring"
    assert any(not torch.equal(first_weights[k], v) for k, v in state["model"].items())
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "log.jsonl"]
