"""Triton kernels of mining and hard-negative loss against plain-PyTorch references.

The kernels run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before
triton is imported, as ``.ci/run`` does with ``MGCCL_TRITON_ON_CPU=1``), or on a CUDA device.
Sizes cross every tile boundary: N, M not multiples of the row/key blocks, D not a power of two
and above BLOCK_D, num above a key tile and above one selection sweep (128), num = 0 and = M.
Small-integer inputs make every similarity exact, so ties and option thresholds compare bit for
bit.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch
from compare import assert_close

import mgccl_ops
from mgccl_ops import reference
from mgccl_ops.ops import multi_grained

try:
    import triton

    from mgccl_ops.triton import hard_negative_loss as loss_kernel
    from mgccl_ops.triton import topk_hard_negatives as mining_kernel
except ImportError:  # the CPU-only CI job may lack triton: only the pure-PyTorch tests run
    triton = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if triton is None:
    DEVICE = None
elif INTERPRETED:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    DEVICE = None
needs_triton = pytest.mark.skipif(DEVICE is None, reason="Triton kernels need TRITON_INTERPRET=1 or a CUDA device")

OPTIONS = ("pos", "q_group", "k_group", "exclude_self", "max_sim", "margin", "skip")


def plain_mining(
    q, k, num, pos=None, q_group=None, k_group=None, exclude_self=False, max_sim=None, margin=None, skip=0
):
    """The CONTRACTS.md rules on the full [N, M] matrix: excluded keys, then a stable descending
    sort (ties to the smaller index), ranks [skip, skip + num), -1 / -inf padding."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    n, m = q.shape[0], k.shape[0]
    sim = q.to(acc) @ k.to(acc).T
    cols = torch.arange(m, device=q.device)[None, :]
    allowed = ~sim.isnan()
    if pos is not None:
        allowed &= cols != pos[:, None]
    if q_group is not None:
        allowed &= k_group[None, :] != q_group[:, None]
    if exclude_self:
        allowed &= cols != torch.arange(n, device=q.device)[:, None]
    if max_sim is not None:
        allowed &= ~(sim > max_sim)
    if margin is not None:
        pos_sim = sim.gather(1, pos.clamp_min(0)[:, None])
        allowed &= (pos[:, None] < 0) | ~(sim > pos_sim - margin)
    # Stable sorts compose: by value descending (ties keep ascending index), then allowed first
    # (a -inf similarity stays ahead of every excluded key).
    by_value = torch.sort(torch.where(allowed, sim, float("-inf")), dim=1, descending=True, stable=True).indices
    allowed_first = torch.sort(allowed.gather(1, by_value).to(torch.int8), dim=1, descending=True, stable=True).indices
    order = by_value.gather(1, allowed_first)
    order = order[:, skip : skip + num]
    taken = allowed.gather(1, order)
    width = order.shape[1]
    idx = torch.full((n, num), -1, dtype=torch.int64, device=q.device)
    out = torch.full((n, num), float("-inf"), dtype=torch.float32, device=q.device)
    idx[:, :width] = torch.where(taken, order, -1)
    out[:, :width] = torch.where(taken, sim.gather(1, order), float("-inf")).float()
    return idx, out


def reference_mining(q, k, num, **options):
    """``mgccl_ops.reference`` once it has the CONTRACTS.md options, else :func:`plain_mining`."""
    if all(name in inspect.signature(reference.topk_hard_negatives).parameters for name in OPTIONS):
        return reference.topk_hard_negatives(q, k, num, **options)
    return plain_mining(q, k, num, **options)


def integer_inputs(n, m, d, dtype=torch.float32, groups=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (n, d), generator=g).to(dtype)
    k = torch.randint(-2, 3, (m, d), generator=g).to(dtype)
    pos = torch.randint(-1, m, (n,), generator=g) if m else torch.full((n,), -1)
    q_group = torch.randint(0, groups, (n,), generator=g)
    k_group = torch.randint(0, groups, (m,), generator=g)
    return [t.to(DEVICE) for t in (q, k, pos, q_group, k_group)]


def mine(q, k, num, **options):
    return mining_kernel.topk_hard_negatives(q, k, num, **options)


def assert_same(ours, ref):
    assert torch.equal(ours[0].cpu(), ref[0].cpu()), f"idx differs at {(ours[0] != ref[0]).nonzero()[:5].tolist()}"
    assert torch.equal(ours[1].cpu(), ref[1].cpu()), "sim differs"


@needs_triton
@pytest.mark.parametrize(
    "n, m, d, num",
    [
        (17, 65, 33, 5),  # N, M one past a block, D past BLOCK_D and odd
        (70, 130, 7, 70),  # num above a 64-key tile (STATE 128), N past the interpreter's 64 rows
        (9, 40, 3, 0),
        (9, 40, 3, 40),  # num = M: every allowed key, then padding
        (5, 300, 4, 261),  # above two 128-entry selections: three sweeps
    ],
)
def test_tile_boundaries_and_exact_ties(n, m, d, num):
    q, k, pos, q_group, k_group = integer_inputs(n, m, d, seed=n + m)
    options = {"pos": pos, "q_group": q_group, "k_group": k_group}
    assert_same(mine(q, k, num, **options), reference_mining(q, k, num, **options))


@needs_triton
@pytest.mark.parametrize(
    "options",
    [
        {"exclude_self": True},
        {"max_sim": 2.0},
        {"margin": 1.0},
        {"margin": -1.0, "max_sim": 4.0},
        {"skip": 3},
        {"skip": 40},  # beyond every row's allowed keys: all padding
        {"exclude_self": True, "margin": 0.0, "skip": 2, "groups": True},
    ],
)
def test_mining_options(options):
    q, k, pos, q_group, k_group = integer_inputs(33, 33, 6, seed=5)
    options = dict(options)
    if options.pop("groups", False):
        options.update(q_group=q_group, k_group=k_group)
    if "margin" in options:
        options["pos"] = pos
    ours = mine(q, k, 9, **options)
    assert_same(ours, reference_mining(q, k, 9, **options))


@needs_triton
def test_options_with_sweeps():
    """Filters hold in every sweep: 300 > 128 selected entries with skip, margin and groups."""
    q, k, pos, q_group, k_group = integer_inputs(6, 400, 5, seed=11)
    options = {"pos": pos, "q_group": q_group, "k_group": k_group, "margin": 0.0, "skip": 20}
    assert_same(mine(q, k, 280, **options), reference_mining(q, k, 280, **options))


@needs_triton
def test_nan_never_selected_and_minus_inf_allowed():
    q, k, pos, _, _ = integer_inputs(8, 30, 4, seed=2)
    q[2] = float("nan")  # a row of NaN similarities: all padding
    k[5] = float("nan")  # a NaN key: never returned
    k[7] = torch.tensor([float("-inf"), 0, 0, 0])
    q[:, 0] = q[:, 0].abs() + 1  # so <q_i, k_7> = -inf for every other row
    q[2] = float("nan")
    ours = mine(q, k, 29, pos=pos)
    assert_same(ours, reference_mining(q, k, 29, pos=pos))
    assert (ours[0][2] == -1).all() and not (ours[0] == 5).any()
    row = 0 if pos[0] != 7 else 1
    assert (ours[0][row] == 7).any() and torch.isneginf(ours[1][row][ours[0][row] == 7]).all()


@needs_triton
def test_rows_with_every_key_excluded():
    q, k, pos, _, _ = integer_inputs(6, 4, 3, seed=3)
    k_group = torch.tensor([0, 0, 1, 1], device=DEVICE)
    q_group = torch.tensor([0, 1, 2, 0, 1, 2], device=DEVICE)
    pos = torch.tensor([2, 0, -1, 3, 3, 1], device=DEVICE)
    ours = mine(q, k, 4, pos=pos, q_group=q_group, k_group=k_group)
    assert (ours[0] >= 0).sum(1).tolist() == [1, 1, 4, 1, 2, 3]
    assert_same(ours, reference_mining(q, k, 4, pos=pos, q_group=q_group, k_group=k_group))


@needs_triton
def test_empty():
    for n, m, num in [(0, 5, 3), (4, 0, 0), (4, 5, 0)]:
        q, k = torch.randn(n, 3, device=DEVICE), torch.randn(m, 3, device=DEVICE)
        idx, sim = mine(q, k, num)
        assert idx.shape == (n, num) and sim.shape == (n, num) and sim.dtype == torch.float32


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_match_reference(dtype):
    """Random (non-integer) inputs: equal similarities, equal keys wherever not a near-tie."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(40, 19, generator=g).to(dtype).to(DEVICE)
    k = torch.randn(90, 19, generator=g).to(dtype).to(DEVICE)
    pos = torch.randint(-1, 90, (40,), generator=g).to(DEVICE)
    ours = mine(q, k, 12, pos=pos, max_sim=3.0)
    ref = reference_mining(q, k, 12, pos=pos, max_sim=3.0)
    atol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(ours[1], ref[1], atol=atol, rtol=0)
    gaps = ref[1][:, :-1] - ref[1][:, 1:]
    clear = torch.ones_like(ref[0], dtype=torch.bool)
    clear[:, :-1] &= gaps > 2 * atol
    clear[:, 1:] &= gaps > 2 * atol
    assert not (clear & (ours[0] != ref[0])).any()


@needs_triton
def test_bad_options():
    q, k, pos, _, _ = integer_inputs(4, 5, 3)
    with pytest.raises(RuntimeError, match="exclude_self=True needs as many queries as keys, got N = 4 and M = 5"):
        mine(q, k, 2, exclude_self=True)
    with pytest.raises(RuntimeError, match="margin needs pos"):
        mine(q, k, 2, margin=0.5)
    with pytest.raises(RuntimeError, match="max_sim should be a number, got nan"):
        mine(q, k, 2, max_sim=float("nan"))
    with pytest.raises(RuntimeError, match="skip should be >= 0, got -1"):
        mine(q, k, 2, skip=-1)
    with pytest.raises(RuntimeError, match=r"num should lie in \[0, M = 5\], got -2"):
        mine(q, k, -2)


def loss_inputs(n, m, d, num_neg, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1).to(dtype)
    pos = torch.randint(0, m, (n,), generator=g)
    pos[::5] = -1
    neg_idx = torch.randint(0, m, (n, num_neg), generator=g)
    neg_idx[::3, 1] = neg_idx[::3, 0]  # duplicates
    neg_idx[::4, -1] = -1  # padding
    neg_idx[1::7] = -1  # rows with only padding
    weight = torch.rand(n, generator=g) + 0.5
    return [t.to(DEVICE) for t in (q, k, pos, neg_idx, weight)]


def reference_grads(q, k, pos, neg_idx, scale, weight, reduction, upstream=None):
    q, k, scale = (t.detach().clone().requires_grad_() for t in (q, k, scale))
    loss = reference.hard_negative_loss(q, k, pos, neg_idx, scale, weight=weight, reduction=reduction)
    target = loss.sum() if upstream is None else (loss * upstream).sum()
    return loss.detach(), torch.autograd.grad(target, [q, k, scale])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_fused_gradients(dtype, reduction):
    """K = 40 negatives (two 32-entry chunks), D = 37 (two D chunks), N = 45."""
    q, k, pos, neg_idx, weight = loss_inputs(45, 23, 37, 40, dtype)
    scale = torch.tensor(6.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=DEVICE)
    loss, row_loss, *grads = loss_kernel.hard_negative_loss(q, k, pos, neg_idx, scale, weight, reduction, [True] * 3)
    ref_loss, ref_grads = reference_grads(q, k, pos, neg_idx, scale, weight, reduction)
    assert_close(loss, ref_loss, dtype, "loss")
    ref_rows = reference.hard_negative_loss(q, k, pos, neg_idx, scale, reduction="none")
    assert_close(row_loss, ref_rows, dtype, "row_loss")
    for name, ours, ref in zip(["grad_q", "grad_k", "grad_scale"], grads, ref_grads):
        assert ours.dtype == ref.dtype, name
        assert_close(ours, ref, dtype, name)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_backward_and_deterministic_grad_k(dtype):
    q, k, pos, neg_idx, _ = loss_inputs(30, 7, 20, 6, dtype, seed=1)
    neg_idx[:, 2] = 3  # a popular key: many entries summed into one row of grad_k
    scale = torch.tensor(3.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=DEVICE)
    row_grad = torch.linspace(0.5, 1.5, 30, dtype=scale.dtype, device=DEVICE)
    first = loss_kernel.hard_negative_loss_backward(row_grad, q, k, pos, neg_idx, scale, [True] * 3)
    _, ref = reference_grads(q, k, pos, neg_idx, scale, None, "none", upstream=row_grad)
    for name, ours, expected in zip(["grad_q", "grad_k", "grad_scale"], first, ref):
        assert_close(ours, expected, dtype, name)
    again = loss_kernel.hard_negative_loss_backward(row_grad, q, k, pos, neg_idx, scale, [False, True, False])
    assert torch.equal(again[1], first[1]) and again[0].numel() == 0 and again[2].numel() == 0


@needs_triton
def test_loss_empty_and_without_negatives():
    scale = torch.tensor(2.0, device=DEVICE)
    for n, m, num_neg in [(0, 4, 3), (5, 0, 2), (6, 4, 0)]:
        q, k = torch.randn(n, 8, device=DEVICE), torch.randn(m, 8, device=DEVICE)
        pos = torch.full((n,), -1 if m == 0 else 1, device=DEVICE)
        neg_idx = torch.full((n, num_neg), -1, device=DEVICE)
        loss, row_loss, gq, gk, gs = loss_kernel.hard_negative_loss(q, k, pos, neg_idx, scale, None, "mean", [True] * 3)
        assert loss.item() == 0 and not row_loss.any() and not gq.any() and not gk.any() and gs.item() == 0


@pytest.mark.skipif(
    triton is None or (os.environ.get("MGCCL_TRITON_ON_CPU") != "1" and not torch.cuda.is_available()),
    reason="multi_grained_loss reaches the Triton kernels on CPU only with MGCCL_TRITON_ON_CPU=1",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_multi_grained_hard_negatives_one_mining_call(dtype, monkeypatch):
    """Levels with and without groups mined in one call over all rows; values and gradients."""
    device = "cpu" if os.environ.get("MGCCL_TRITON_ON_CPU") == "1" else "cuda"
    g = torch.Generator().manual_seed(0)
    k = torch.nn.functional.normalize(torch.randn(37, 19, generator=g), dim=1).to(dtype).to(device)
    k_group = torch.randint(0, 6, (37,), generator=g).to(device)
    levels = []
    for index, n in enumerate([21, 40, 9]):
        q = torch.nn.functional.normalize(torch.randn(n, 19, generator=g), dim=1).to(dtype).to(device)
        pos = torch.randint(-1, 37, (n,), generator=g).to(device)
        level = (q.requires_grad_(), pos, 1.0 / (index + 1))
        levels.append(level if index == 1 else (*level, k_group[pos.clamp_min(0)]))
    calls = []
    mine_all = multi_grained.topk_hard_negatives
    monkeypatch.setattr(
        multi_grained, "topk_hard_negatives", lambda q, *a, **kw: calls.append(q.shape[0]) or mine_all(q, *a, **kw)
    )
    total, per_level = mgccl_ops.multi_grained_loss(levels, k, 8.0, k_group=k_group, hard_negatives=12)
    ref_total, ref_per_level = reference.multi_grained_loss(levels, k, 8.0, k_group=k_group, hard_negatives=12)
    assert calls == [70]
    assert_close(total, ref_total, dtype, "total")
    assert_close(per_level, ref_per_level, dtype, "per_level")
    grads = torch.autograd.grad(total, [level[0] for level in levels])
    ref_grads = torch.autograd.grad(ref_total, [level[0] for level in levels])
    for ours, ref in zip(grads, ref_grads):
        assert_close(ours, ref, dtype, "grad q")


@pytest.mark.skipif(os.environ.get("MGCCL_TRITON_ON_CPU") != "1", reason="needs MGCCL_TRITON_ON_CPU=1")
def test_triton_kernels_serve_cpu_tensors():
    """Under MGCCL_TRITON_ON_CPU=1 the Python (Triton) kernels replace the C++ CPU kernels."""
    for op in ("topk_hard_negatives", "hard_negative_loss", "hard_negative_loss_backward"):
        table = torch._C._dispatch_dump(f"mgccl::{op}")
        cpu = next(line for line in table.splitlines() if line.startswith("CPU:"))
        assert "torch/library.py" in cpu, f"{op}: {cpu}"


def test_row_groups_without_a_key_group_match_nothing():
    """Mixed levels: renumbered groups keep equality between rows and keys, -1 matches no key."""
    k_group = torch.tensor([7, -3, 7, 2**62, 5])
    levels = [
        multi_grained.Level(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long), 1.0, torch.tensor([7, 4, 2**62])),
        multi_grained.Level(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), 1.0, None),
    ]
    q_group, key_ids = multi_grained.row_groups(levels, k_group)
    same = q_group[:, None] == key_ids[None, :]
    expected = torch.tensor([[1, 0, 1, 0, 0], [0] * 5, [0, 0, 0, 1, 0], [0] * 5, [0] * 5], dtype=torch.bool)
    assert torch.equal(same, expected)


@pytest.mark.skipif(triton is None, reason="triton is not installed")
def test_aot_configs_cover_every_launch():
    """Every configuration the GPU path can launch is listed for the ahead-of-time compile."""

    def key(kernel, constexprs, num_warps, num_stages, maxnreg=None):
        constants = tuple(sorted((k, str(v)) for k, v in constexprs.items()))
        return (kernel.__name__, constants, num_warps, num_stages, maxnreg)

    listed = {
        key(c["kernel"], c["constexprs"], c["num_warps"], c["num_stages"], c.get("maxnreg"))
        for module in (mining_kernel, loss_kernel)
        for c in module.AOT_CONFIGS
    }
    for dtype, acc in [
        (torch.float16, "fp32"),
        (torch.bfloat16, "fp32"),
        (torch.float32, "fp32"),
        (torch.float64, "fp64"),
    ]:
        for total in [1, 2, 3, 5, 16, 64, 65, 200, 256, 257, 1024, 5000]:
            config = mining_kernel.launch_config(total, dtype)
            warps, stages, maxnreg = config.pop("num_warps"), config.pop("num_stages"), config.pop("maxnreg")
            constexprs = {"ACC": getattr(triton.language, "float64" if acc == "fp64" else "float32"), "UPCAST": False}
            constexprs.update(PRECISION="ieee", **config)
            assert key(mining_kernel._mine_kernel, constexprs, warps, stages, maxnreg) in listed, (dtype, total)
        for entries in [1, 2, 9, 33, 1025]:
            for d in [1, 7, 64, 768]:
                config = loss_kernel.row_config(entries, d)
                warps, stages = config.pop("num_warps"), config.pop("num_stages")
                constexprs = {"ACC": getattr(triton.language, "float64" if acc == "fp64" else "float32"), **config}
                assert key(loss_kernel._rows_kernel, constexprs, warps, stages) in listed, (dtype, entries, d)
        config = loss_kernel.key_config()
        warps, stages = config.pop("num_warps"), config.pop("num_stages")
        constexprs = {"ACC": getattr(triton.language, "float64" if acc == "fp64" else "float32"), **config}
        assert key(loss_kernel._key_grad_kernel, constexprs, warps, stages) in listed, dtype
