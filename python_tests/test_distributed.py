"""mgccl_ops.distributed on gloo (CPU) with 2 and 4 spawned processes.

The contract: under DDP, parameter gradients (and the loss) equal single-process training
with the fused op on the concatenated batch, for both modes, equal and unequal local sizes
(one rank may be empty), fp64. Gather mode also equals open_clip's ClipLoss(local_loss=True,
gather_with_grad=True) on every rank.
"""

from __future__ import annotations

import math

import pytest
import rank_cases
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import mgccl_ops
from mgccl_ops import distributed

TOL = {"rtol": 1e-10, "atol": 1e-12}


def run_case(world: int, case: str, tmp_path_factory) -> None:
    rank_cases.run_case(__name__, world, case, tmp_path_factory)


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


def _case_ring_dtypes(rank: int, world: int) -> None:
    """Ring mode in float32, bfloat16 and float16 (and a non-contiguous shard) gives gather
    mode's loss and gradients within the dtype's rounding."""
    sizes = [3, 5, 0, 4][:world]
    tolerances = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
    for dtype, tol in tolerances.items():
        gen = torch.Generator().manual_seed(5)
        both = F.normalize(torch.randn(2, sum(sizes), 6, generator=gen), dim=-1)
        results = []
        for mode in ("gather", "ring"):
            q, k = (x[_rows(sizes, rank)].to(dtype).clone().requires_grad_() for x in both)
            scale = torch.tensor(7.0, requires_grad=True)
            key_input = k.t().contiguous().t() if mode == "ring" else k  # column-major for the ring
            loss = distributed.contrastive_loss(q, key_input, scale, mode=mode)
            loss.backward()
            assert loss.dtype == torch.float32 and q.grad.dtype == dtype, (loss.dtype, q.grad.dtype)
            # A replicated scale's gradient is split between the ranks differently by the two
            # modes; what DDP applies, the sum over the ranks, is the same.
            dist.all_reduce(scale.grad)
            results.append((loss.detach(), q.grad, k.grad, scale.grad))
        for ours, theirs in zip(results[1], results[0]):
            torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol, msg=lambda m, t=dtype: f"{t}: {m}")


def _case_bad_input_on_one_rank(rank: int, world: int) -> None:
    """A bad argument on one rank raises on every rank (its own message there, a message naming
    it on the others) instead of leaving the others waiting; the group stays usable."""
    q, k = F.normalize(torch.randn(2, 3, 4, dtype=torch.float64), dim=-1)
    bank_level = (q, torch.tensor([0, 1, 2]), 1.0)
    cases = [
        (1, "q should", lambda bad: distributed.contrastive_loss(q[None] if bad else q, k, 5.0)),
        (0, "mode", lambda bad: distributed.contrastive_loss(q, k, 5.0, mode="tree" if bad else "ring")),
        (1, "scale should be finite", lambda bad: distributed.contrastive_loss(q, k, math.nan if bad else 5.0)),
        (0, "hard_negatives",
         lambda bad: distributed.multi_grained_loss([bank_level], k, 5.0, hard_negatives=-1 if bad else 2)),
    ]  # fmt: skip
    for culprit, own_message, call in cases:
        expected = own_message if rank == culprit else rf"the inputs of rank\(s\) \[{culprit}\] failed"
        with pytest.raises(ValueError, match=expected):
            call(rank == culprit)
    full = mgccl_ops.contrastive_loss(torch.cat([q] * world), torch.cat([k] * world), torch.arange(3 * world), 5.0,
                                      symmetric=True)  # fmt: skip
    torch.testing.assert_close(distributed.contrastive_loss(q, k, 5.0, mode="ring"), full, **TOL)


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


def _assert_ddp_equals_one_process(rank, towers, everything, mine, what, shared_keys=0, **options) -> None:
    """multi_grained_loss in one process on the concatenated inputs against the distributed one
    on this rank's (DDP, equal initial weights): loss, per-level means and gradients.

    ``everything`` and ``mine``: (part_x, pixel_x, bank_x, level_pos [2], level_group [2],
    k_group); ``options`` go to both calls, ``shared_keys`` to the distributed one.
    """
    weights = (0.5, 1.0)
    results = []
    for inputs in (everything, mine):
        torch.manual_seed(1)
        model = towers().double()
        if inputs is mine:
            model = DistributedDataParallel(model)
        part_x, pixel_x, bank_x, pos, groups, k_group = inputs
        part_q, pixel_q, bank, scale = model(part_x, pixel_x, bank_x)
        levels = [(q, pos[lv], weights[lv], groups[lv]) for lv, q in enumerate((part_q, pixel_q))]
        if inputs is mine:
            loss, per_level = distributed.multi_grained_loss(
                levels, bank, scale, k_group=k_group, shared_keys=shared_keys, **options
            )
        else:
            loss, per_level = mgccl_ops.multi_grained_loss(levels, bank, scale, k_group=k_group, **options)
        loss.backward()
        results.append((loss.detach(), per_level, getattr(model, "module", model)))
    (expected, expected_levels, reference), (loss, per_level, trained) = results
    what = f"{what} options={options} rank={rank}"
    torch.testing.assert_close(loss, expected, **TOL, msg=lambda m: f"{what}: loss: {m}")
    torch.testing.assert_close(per_level, expected_levels, **TOL)
    _assert_grads_equal(trained, reference, what)


def _case_multi_grained(rank: int, world: int) -> None:
    configs = {
        2: [([4, 4], [[3, 5], [3, 5]]), ([6, 2], [[4, 2], [1, 7]])],
        4: [([3, 3, 3, 3], [[2, 4]] * 4), ([5, 1, 0, 3], [[3, 2], [2, 0], [0, 0], [1, 4]])],
    }[world]
    for banks, rows in configs:
        shards = _bank_data(world, banks, rows)
        offsets = [sum(banks[:r]) for r in range(world)]
        everything = (
            torch.cat([s[2][0][0] for s in shards]),
            torch.cat([s[2][1][0] for s in shards]),
            torch.cat([s[0] for s in shards]),
            [
                torch.cat([torch.where(s[2][lv][1] >= 0, s[2][lv][1] + off, -1) for s, off in zip(shards, offsets)])
                for lv in range(2)
            ],
            [torch.cat([s[2][lv][2] for s in shards]) for lv in range(2)],
            torch.cat([s[1] for s in shards]),
        )
        bank_x, groups, levels = shards[rank]
        mine = (levels[0][0], levels[1][0], bank_x, [lv[1] for lv in levels], [lv[2] for lv in levels], groups)
        for negatives in (None, 3):
            _assert_ddp_equals_one_process(
                rank, BankTowers, everything, mine, f"banks={banks} rows={rows}", hard_negatives=negatives
            )


class BankTowersWithBackground(BankTowers):
    """:class:`BankTowers` whose bank ends with one learned key, replicated on every rank."""

    def __init__(self):
        super().__init__()
        self.background = nn.Parameter(torch.linspace(-1.0, 1.0, 5, dtype=torch.float64))

    def forward(self, part_x, pixel_x, bank_x):
        part_q, pixel_q, bank, scale = super().forward(part_x, pixel_x, bank_x)
        return part_q, pixel_q, torch.cat([bank, F.normalize(self.background, dim=0)[None]]), scale


BACKGROUND_GROUP = 9  # the shared key's group id, past the random groups 0..3


def _with_background_positives(pos: torch.Tensor, bank_rows: int) -> torch.Tensor:
    """Every third row's positive moved to the shared key (local row ``bank_rows``)."""
    moved = pos.clone()
    moved[1::3] = bank_rows
    return moved


def _case_multi_grained_shared_key(rank: int, world: int) -> None:
    """A key replicated on every rank (a learned background) enters the global bank once:
    DDP equals one process on [every rank's own keys, the shared key]."""
    banks, rows = {2: ([4, 3], [[3, 5], [4, 2]]), 4: ([3, 0, 2, 3], [[2, 4], [3, 1], [0, 2], [1, 4]])}[world]
    shards = _bank_data(world, banks, rows)
    offsets = [sum(banks[:r]) for r in range(world)]
    local_pos = [[_with_background_positives(s[2][lv][1], m) for lv in range(2)] for s, m in zip(shards, banks)]
    local_group = [[torch.where(p == m, BACKGROUND_GROUP, s[2][lv][2]) for lv, p in enumerate(ps)]
                   for s, m, ps in zip(shards, banks, local_pos)]  # fmt: skip

    def global_pos(lv: int, shard: int) -> torch.Tensor:
        pos, m = local_pos[shard][lv], banks[shard]
        return torch.where(pos == m, sum(banks), torch.where(pos >= 0, pos + offsets[shard], -1))

    background = torch.tensor([BACKGROUND_GROUP])
    everything = (
        torch.cat([s[2][0][0] for s in shards]),
        torch.cat([s[2][1][0] for s in shards]),
        torch.cat([s[0] for s in shards]),
        [torch.cat([global_pos(lv, r) for r in range(world)]) for lv in range(2)],
        [torch.cat([local_group[r][lv] for r in range(world)]) for lv in range(2)],
        torch.cat([s[1] for s in shards] + [background]),
    )
    bank_x, groups, levels = shards[rank]
    mine = (levels[0][0], levels[1][0], bank_x, local_pos[rank], local_group[rank], torch.cat([groups, background]))
    for negatives in (None, 3):
        _assert_ddp_equals_one_process(
            rank, BankTowersWithBackground, everything, mine, f"shared key: banks={banks}", shared_keys=1,
            hard_negatives=negatives,
        )  # fmt: skip


def _case_shared_keys_must_agree(rank: int, world: int) -> None:
    k = F.normalize(torch.randn(3, 4, dtype=torch.float64), dim=-1)
    level = (k[:2], torch.tensor([0, 1]), 1.0)
    try:
        distributed.multi_grained_loss([level], k, 5.0, shared_keys=rank % 2)
    except ValueError as error:
        assert "shared_keys should be the same on every rank, got [0, 1" in str(error), error
    else:
        raise AssertionError("different shared_keys per rank were accepted")


CASE_WORLDS = {
    "contrastive": (2, 4),
    "open_clip": (2, 4),
    "subgroup_ring": (4,),
    "ring_dtypes": (2, 4),
    "bad_input_on_one_rank": (2,),
    "multi_grained": (2, 4),
    "multi_grained_shared_key": (2, 4),
    "shared_keys_must_agree": (2,),
}
CASES = {
    "contrastive": _case_contrastive,
    "open_clip": _case_open_clip,
    "subgroup_ring": _case_subgroup_ring,
    "ring_dtypes": _case_ring_dtypes,
    "bad_input_on_one_rank": _case_bad_input_on_one_rank,
    "multi_grained": _case_multi_grained,
    "multi_grained_shared_key": _case_multi_grained_shared_key,
    "shared_keys_must_agree": _case_shared_keys_must_agree,
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


@pytest.mark.parametrize("world", [2, 4])
def test_multi_grained_shared_key_enters_the_global_bank_once(world, tmp_path_factory):
    run_case(world, "multi_grained_shared_key", tmp_path_factory)


def test_shared_keys_must_agree_across_ranks(tmp_path_factory):
    run_case(2, "shared_keys_must_agree", tmp_path_factory)


@pytest.mark.parametrize("world", [2, 4])
def test_ring_in_low_precision_equals_gather(world, tmp_path_factory):
    run_case(world, "ring_dtypes", tmp_path_factory)


def test_ring_on_a_subgroup_uses_global_peer_ranks(tmp_path_factory):
    run_case(4, "subgroup_ring", tmp_path_factory)


def test_needs_an_initialised_process_group():
    q = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="not initialised"):
        distributed.contrastive_loss(q, q, 1.0)


def test_bad_input_on_one_rank_raises_on_every_rank(tmp_path_factory):
    run_case(2, "bad_input_on_one_rank", tmp_path_factory)
