"""mgccl_ops.distributed on gloo (CPU) with 2 and 4 spawned processes.

The contract: under DDP, parameter gradients (and the loss) equal single-process training
with the fused op on the concatenated batch, for both modes, equal and unequal local sizes
(one rank may be empty), fp64. Gather mode also equals open_clip's ClipLoss(local_loss=True,
gather_with_grad=True) on every rank.
"""

from __future__ import annotations

import datetime
import functools
import math
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import mgccl_ops
from mgccl_ops import distributed

TOL = {"rtol": 1e-10, "atol": 1e-12}


def _worker(rank: int, world: int, store: str, cases: list[str], out: str) -> None:
    """Runs each case on this rank and writes ``ok`` or its traceback to ``out/case.rank``."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    torch.set_num_threads(1)
    try:
        for case in cases:
            try:
                CASES[case](rank, world)
                outcome = "ok"
            except Exception:
                outcome = traceback.format_exc()
            Path(out, f"{case}.{rank}").write_text(outcome)
    finally:
        dist.destroy_process_group()


@functools.cache
def _outcomes(world: int, folder: str) -> dict[str, list[str]]:
    """Runs every case of ``world`` in one spawn of ``world`` processes (the interpreter start
    is most of the cost); returns each case's outcome on each rank."""
    cases = [name for name, worlds in CASE_WORLDS.items() if world in worlds]
    mp.spawn(_worker, args=(world, f"{folder}/store", cases, folder), nprocs=world, join=True)
    return {case: [Path(folder, f"{case}.{rank}").read_text() for rank in range(world)] for case in cases}


def run_case(world: int, case: str, tmp_path_factory) -> None:
    """Fails with the rank's traceback unless ``case`` passed on every rank."""
    folder = str(tmp_path_factory.getbasetemp() / f"world{world}")
    os.makedirs(folder, exist_ok=True)
    for rank, outcome in enumerate(_outcomes(world, folder)[case]):
        assert outcome == "ok", f"rank {rank} of {world}:\n{outcome}"


class Towers(nn.Module):
    """Two linear towers to unit-norm embeddings and a learnable logit scale (fp64)."""

    def __init__(self):
        super().__init__()
        self.image = nn.Linear(6, 5)
        self.text = nn.Linear(7, 5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(8.0)))

    def forward(self, x, y):
        return F.normalize(self.image(x), dim=-1), F.normalize(self.text(y), dim=-1), self.logit_scale.exp()


def _rows(sizes: list[int], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _assert_grads_equal(model: nn.Module, reference: nn.Module, what: str) -> None:
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=lambda m, name=name: f"{what}: {name}: {m}")


def _case_contrastive(rank: int, world: int) -> None:
    size_sets = {2: [[4, 4], [5, 2]], 4: [[3, 3, 3, 3], [4, 0, 1, 3]]}[world]
    for sizes in size_sets:
        total = sum(sizes)
        gen = torch.Generator().manual_seed(total)
        x = torch.randn(total, 6, generator=gen, dtype=torch.float64)
        y = torch.randn(total, 7, generator=gen, dtype=torch.float64)
        torch.manual_seed(0)
        reference = Towers().double()
        q, k, scale = reference(x, y)
        for symmetric in (True, False):
            reference.zero_grad()
            q, k, scale = reference(x, y)
            expected = mgccl_ops.contrastive_loss(q, k, torch.arange(total), scale, symmetric=symmetric)
            expected.backward()
            for mode in ("gather", "ring"):
                torch.manual_seed(0)
                model = DistributedDataParallel(Towers().double())
                q, k, scale = model(x[_rows(sizes, rank)], y[_rows(sizes, rank)])
                loss = distributed.contrastive_loss(q, k, scale, mode=mode, symmetric=symmetric)
                loss.backward()
                what = f"mode={mode} symmetric={symmetric} sizes={sizes} rank={rank}"
                torch.testing.assert_close(loss, expected.detach(), **TOL, msg=lambda m, w=what: f"{w}: loss: {m}")
                _assert_grads_equal(model.module, reference, what)


def _case_open_clip(rank: int, world: int) -> None:
    from open_clip.loss import ClipLoss

    gen = torch.Generator().manual_seed(7)
    features = torch.randn(2, world * 5, 8, generator=gen, dtype=torch.float64)
    features = F.normalize(features[:, rank * 5 : rank * 5 + 5], dim=-1)
    grads = []
    losses = []
    for run in ("open_clip", "ours"):
        q, k = (f.clone().requires_grad_() for f in features)
        scale = torch.tensor(11.0, dtype=torch.float64, requires_grad=True)
        if run == "open_clip":
            clip = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
            loss = clip(q, k, scale)
        else:
            loss = distributed.contrastive_loss(q, k, scale, mode="gather")
        loss.backward()
        losses.append(loss.detach())
        grads.append((q.grad, k.grad, scale.grad))
    for ours, theirs in zip(grads[1], grads[0]):
        torch.testing.assert_close(ours, theirs, **TOL)
    mean_open_clip = losses[0].clone()
    dist.all_reduce(mean_open_clip)
    torch.testing.assert_close(losses[1], mean_open_clip / world, **TOL)


def _case_subgroup_ring(rank: int, world: int) -> None:
    """A ring over ranks {1, 3} of 4 (the peers are global ranks) equals one process."""
    members = [1, 3]
    group = dist.new_group(members)
    if rank not in members:
        return
    gen = torch.Generator().manual_seed(3)
    q, k = F.normalize(torch.randn(2, 6, 4, generator=gen, dtype=torch.float64), dim=-1)
    expected = mgccl_ops.contrastive_loss(q, k, torch.arange(6), 5.0, symmetric=True)
    mine = slice(0, 2) if rank == 1 else slice(2, 6)
    for mode in ("ring", "gather"):
        loss = distributed.contrastive_loss(q[mine], k[mine], 5.0, mode=mode, group=group)
        torch.testing.assert_close(loss, expected, **TOL)


class BankTowers(nn.Module):
    """Level queries and entity-bank keys from linear maps, unit norm, learnable scale (fp64)."""

    def __init__(self):
        super().__init__()
        self.part = nn.Linear(6, 5)
        self.pixel = nn.Linear(6, 5)
        self.bank = nn.Linear(7, 5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(6.0)))

    def forward(self, part_x, pixel_x, bank_x):
        unit = lambda t: F.normalize(t, dim=-1)  # noqa: E731
        return unit(self.part(part_x)), unit(self.pixel(pixel_x)), unit(self.bank(bank_x)), self.logit_scale.exp()


def _bank_data(world: int, banks: list[int], rows: list[list[int]]):
    """Per-rank bank inputs, groups, level inputs and local positives (-1 sometimes)."""
    gen = torch.Generator().manual_seed(sum(banks) * 31 + world)
    shards = []
    for rank, m in enumerate(banks):
        bank_x = torch.randn(m, 7, generator=gen, dtype=torch.float64)
        groups = torch.randint(0, 4, (m,), generator=gen)
        levels = []
        for n in rows[rank]:
            x = torch.randn(n, 6, generator=gen, dtype=torch.float64)
            pos = torch.randint(0, m, (n,), generator=gen) if m else torch.full((n,), -1)
            if n > 1:
                pos[0] = -1
            levels.append((x, pos, torch.where(pos >= 0, groups[pos.clamp_min(0)] if m else pos, -1)))
        shards.append((bank_x, groups, levels))
    return shards


def _case_multi_grained(rank: int, world: int) -> None:
    configs = {
        2: [([4, 4], [[3, 5], [3, 5]]), ([6, 2], [[4, 2], [1, 7]])],
        4: [([3, 3, 3, 3], [[2, 4]] * 4), ([5, 1, 0, 3], [[3, 2], [2, 0], [0, 0], [1, 4]])],
    }[world]
    weights = (0.5, 1.0)
    for banks, rows in configs:
        shards = _bank_data(world, banks, rows)
        offsets = [sum(banks[:r]) for r in range(world)]
        bank_x = torch.cat([s[0] for s in shards])
        k_group = torch.cat([s[1] for s in shards])
        level_x = [torch.cat([s[2][lv][0] for s in shards]) for lv in range(2)]
        level_pos = [
            torch.cat([torch.where(s[2][lv][1] >= 0, s[2][lv][1] + off, -1) for s, off in zip(shards, offsets)])
            for lv in range(2)
        ]
        level_group = [torch.cat([s[2][lv][2] for s in shards]) for lv in range(2)]
        for negatives in (None, 3):
            torch.manual_seed(1)
            reference = BankTowers().double()
            part_q, pixel_q, bank, scale = reference(level_x[0], level_x[1], bank_x)
            levels = [(q, level_pos[lv], weights[lv], level_group[lv]) for lv, q in enumerate((part_q, pixel_q))]
            expected, expected_levels = mgccl_ops.multi_grained_loss(
                levels, bank, scale, k_group=k_group, hard_negatives=negatives
            )
            expected.backward()

            torch.manual_seed(1)
            model = DistributedDataParallel(BankTowers().double())
            mine_bank, mine_groups, mine_levels = shards[rank]
            part_q, pixel_q, bank, scale = model(mine_levels[0][0], mine_levels[1][0], mine_bank)
            levels = [
                (q, mine_levels[lv][1], weights[lv], mine_levels[lv][2]) for lv, q in enumerate((part_q, pixel_q))
            ]
            loss, per_level = distributed.multi_grained_loss(
                levels, bank, scale, k_group=mine_groups, hard_negatives=negatives
            )
            loss.backward()
            what = f"banks={banks} rows={rows} negatives={negatives} rank={rank}"
            torch.testing.assert_close(loss, expected.detach(), **TOL, msg=lambda m, w=what: f"{w}: loss: {m}")
            torch.testing.assert_close(per_level, expected_levels, **TOL)
            _assert_grads_equal(model.module, reference, what)


CASE_WORLDS = {"contrastive": (2, 4), "open_clip": (2, 4), "subgroup_ring": (4,), "multi_grained": (2, 4)}
CASES = {
    "contrastive": _case_contrastive,
    "open_clip": _case_open_clip,
    "subgroup_ring": _case_subgroup_ring,
    "multi_grained": _case_multi_grained,
}


@pytest.mark.parametrize("world", [2, 4])
def test_contrastive_ddp_gradients_equal_single_process(world, tmp_path_factory):
    run_case(world, "contrastive", tmp_path_factory)


@pytest.mark.parametrize("world", [2, 4])
def test_multi_grained_ddp_gradients_equal_single_process(world, tmp_path_factory):
    run_case(world, "multi_grained", tmp_path_factory)


@pytest.mark.parametrize("world", [2, 4])
def test_gather_mode_equals_open_clip(world, tmp_path_factory):
    pytest.importorskip("open_clip")
    run_case(world, "open_clip", tmp_path_factory)


def test_ring_on_a_subgroup_uses_global_peer_ranks(tmp_path_factory):
    run_case(4, "subgroup_ring", tmp_path_factory)


def test_needs_an_initialised_process_group():
    q = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="not initialised"):
        distributed.contrastive_loss(q, q, 1.0)


def test_rejects_an_unknown_mode():
    q = torch.randn(3, 4)
    with pytest.raises(ValueError, match="mode"):
        distributed.contrastive_loss(q, q, 1.0, mode="tree")
