"""Triton kernel of hard-negative mining (DESIGN.md op 2, schema of CONTRACTS.md).

One program owns ``BLOCK_N`` query rows and sweeps the key bank in tiles of ``BLOCK_M`` keys:
``s = q_tile @ k_tile.T`` (``tl.dot``, fp32 accumulation, fp64 for fp64 inputs), the exclusion
rules turn disallowed entries into a sentinel, and a running per-row top-``STATE`` selection
absorbs the tile. The N x M similarities never exist; beyond inputs and outputs a program holds
one tile and its rows' selections.

Selection by packed keys. Each candidate is one int64: the high 32 bits are the score's float32
bits mapped to a signed integer of the same order (negative floats have their magnitude bits
flipped), the low 32 bits hold ``2**32 - 1 - j``. Integer order of the packed values is "larger
similarity first, then smaller key index", the order of the CPU kernel, and every packed value
of a row is distinct. Excluded keys (positive, same group, self, above ``max_sim``, within
``margin`` of the positive, NaN, past the end) become ``INT64_MIN``, below every allowed value
(``-inf`` included, which stays selectable). The running selection is kept ascending; a tile
with any candidate above the row's current minimum is merged: its best ``STATE`` candidates
(``packed_topk``, descending; a 64-key tile sorted and padded with the sentinel when STATE is
larger) against the ascending selection element-wise (``max`` of an
ascending and a descending sequence is the top half of their union, a bitonic sequence), then a
bitonic merge sorts it again (``packed_sort.py``: ``tl.topk`` / ``tl.bitonic_merge`` networks whose
pair exchange runs as one NumPy call under the interpreter). Tiles with nothing above the bar cost no sorting.

Sweeps (the path for ``num + skip`` above ``STATE_MAX``). A program's selection holds at most
``STATE_MAX = 128`` entries per row: with 256 the kernel needs more than the 255 registers a
thread may have on sm_80 (ptxas spilled 48-288 bytes for every dtype, 16 rows, 8 warps), so a
wider selection cannot stay in registers. Larger counts run as ``ceil((num + skip) / 128)``
sweeps over the key bank inside the same launch: sweep p keeps only keys whose packed value lies
strictly below the smallest one selected by sweep p - 1 (exact, since packed values are
distinct), so it yields ranks [128 p, 128 p + 128). ``num + skip <= 128`` is one sweep, 1024
takes eight, and any larger count (up to M) works the same way: time grows with the number of
sweeps (each recomputes the tile products), memory stays O(N * num) and the N x M matrix never
exists.

fp64 inputs: the similarities are accumulated in fp64 and filtered (``max_sim``, ``margin``) in
fp64, but ranked by their float32 rounding (the packed key has 32 bits for the score). Keys whose
fp64 similarities differ only below float32 resolution are therefore ordered by index; ``sim``
is float32 for every dtype, so the returned values are those of the reference.

The margin rule needs the row's positive similarity first: it is computed with the same tiled
``tl.dot`` over ``D`` as the tiles (a BLOCK_N x BLOCK_N product of the rows against their
positives' keys, diagonal taken), so ``s_ij`` and ``s_i,pos[i]`` of equal keys round alike.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mgccl_ops.ops.hard_negatives import check_mining_options
from mgccl_ops.triton.packed_sort import packed_bitonic_merge_ascending, packed_topk

OP = "topk_hard_negatives"
BLOCK_N = 16
# Under the interpreter a program costs its op count, not its size: wider row blocks (the same
# code, masks and merges) keep the CPU test suite fast.
INTERPRETER_BLOCK_N = 64
BLOCK_D = 32
STATE_MIN = 8
STATE_MAX = 128
SENTINEL = tl.constexpr(-(2**63))  # packed value of an excluded key: below every allowed one
NO_BOUND = tl.constexpr(2**63 - 1)  # first sweep's upper bound: above every allowed packed value


@triton.jit
def _pack(score, cols):
    """Order-preserving int64 of (float32 score, smaller key index first)."""
    bits = score.to(tl.float32).to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    inverted = (~cols).to(tl.uint32, bitcast=True).to(tl.int64)  # 2**32 - 1 - j
    return (ordered.to(tl.int64) << 32) | inverted


@triton.jit
def _unpack(packed):
    """(key index, float32 score) of packed values; the SENTINEL gives (-1, -inf)."""
    taken = packed != SENTINEL
    ordered = (packed >> 32).to(tl.int32)
    bits = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    score = bits.to(tl.float32, bitcast=True)
    key = (~packed.to(tl.int32)).to(tl.int64)
    return tl.where(taken, key, -1), tl.where(taken, score, float("-inf"))


@triton.jit
def _similarity_tile(
    Q,
    K,
    rows,
    cols,
    row_ok,
    col_ok,
    D,
    stride_q,
    stride_k,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """[BLOCK_N, BLOCK_M] products <q_rows, k_cols> accumulated in ACC over D in BLOCK_D steps."""
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + offs_d) < D
        qd = tl.load(
            Q + rows[:, None] * stride_q + (d0 + offs_d)[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
        )
        kd = tl.load(
            K + cols[:, None].to(tl.int64) * stride_k + (d0 + offs_d)[None, :],
            mask=col_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            qd = qd.to(ACC)
            kd = kd.to(ACC)
        acc = tl.dot(qd, tl.trans(kd), acc, input_precision=PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def _mine_kernel(
    Q,
    K,
    pos_ptr,
    q_group_ptr,
    k_group_ptr,
    bounds_ptr,
    idx_ptr,
    sim_ptr,
    N,
    M,
    D,
    num,
    skip,
    sweeps,
    stride_q,
    stride_k,
    has_pos,
    has_group,
    exclude_self,
    has_max_sim,
    has_margin,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STATE: tl.constexpr,
):
    """idx/sim [N, num]: per row the allowed keys of ranks [skip, skip + num) (see module doc).

    The options are runtime flags (0/1; a pointer whose flag is 0 is never read), so one compiled
    kernel per (dtype, STATE) serves every combination. bounds_ptr: [2] in ACC, (max_sim, margin).
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    pos = tl.load(pos_ptr + rows, mask=row_ok & (has_pos != 0), other=-1)
    q_group = tl.load(q_group_ptr + rows, mask=row_ok & (has_group != 0), other=0)
    max_sim = tl.load(bounds_ptr)
    margin_bar = tl.full([BLOCK_N], float("inf"), ACC)
    if has_margin != 0:
        # The positive similarity of every row, by the same tiled product as the tiles.
        with_pos = pos >= 0
        pos_tile = _similarity_tile(
            Q,
            K,
            rows,
            tl.where(with_pos, pos, 0),
            row_ok,
            with_pos,
            D,
            stride_q,
            stride_k,
            ACC,
            UPCAST,
            PRECISION,
            BLOCK_N,
            BLOCK_N,
            BLOCK_D,
        )
        diagonal = tl.arange(0, BLOCK_N)[:, None] == tl.arange(0, BLOCK_N)[None, :]
        pos_sim = tl.sum(tl.where(diagonal, pos_tile, 0.0), axis=1)
        margin_bar = tl.where(with_pos, pos_sim - tl.load(bounds_ptr + 1), float("inf"))

    upper = tl.full([BLOCK_N], NO_BOUND, tl.int64)
    slots = tl.arange(0, STATE)
    total = num + skip
    for sweep in range(sweeps):
        state = tl.full([BLOCK_N, STATE], SENTINEL, tl.int64)  # ascending
        for j0 in range(0, M, BLOCK_M):
            cols = j0 + tl.arange(0, BLOCK_M)
            col_ok = cols < M
            s = _similarity_tile(
                Q,
                K,
                rows,
                cols,
                row_ok,
                col_ok,
                D,
                stride_q,
                stride_k,
                ACC,
                UPCAST,
                PRECISION,
                BLOCK_N,
                BLOCK_M,
                BLOCK_D,
            )
            k_group = tl.load(k_group_ptr + cols, mask=col_ok & (has_group != 0), other=0)
            allowed = row_ok[:, None] & col_ok[None, :] & (s == s)
            allowed &= cols[None, :] != pos[:, None]
            allowed &= (k_group[None, :] != q_group[:, None]) | (has_group == 0)
            allowed &= (cols[None, :] != rows[:, None]) | (exclude_self == 0)
            allowed &= ~(s > max_sim) | (has_max_sim == 0)
            allowed &= ~(s > margin_bar[:, None])  # +inf bar: no positive or no margin
            packed = _pack(s, cols)
            packed = tl.where(allowed & (packed < upper[:, None]), packed, SENTINEL)
            bar = tl.min(state, axis=1)
            # A loop of 0 or 1 trips rather than an `if`: Triton 3.8 fails to unify the layouts
            # of an scf.if yielding the merged selection (fp16, STATE 128, sm_80).
            for _ in range(tl.max((packed > bar[:, None]).to(tl.int32))):
                if STATE <= BLOCK_M:
                    best = packed_topk(packed, STATE)
                else:  # the tile sorted, then padded to STATE entries (still descending)
                    chunk = tl.arange(0, STATE // BLOCK_M)[None, :, None]
                    spread = tl.where(chunk == 0, packed_topk(packed, BLOCK_M)[:, None, :], SENTINEL)
                    best = tl.reshape(spread, [BLOCK_N, STATE])
                state = packed_bitonic_merge_ascending(tl.maximum(state, best))
        # state[:, c] has rank sweep * STATE + STATE - 1 - c.
        rank = sweep * STATE + (STATE - 1 - slots)
        out = rank[None, :] - skip
        keep = row_ok[:, None] & (out >= 0) & (rank < total)[None, :]
        key, score = _unpack(state)
        tl.store(idx_ptr + rows[:, None] * num + out, key, mask=keep)
        tl.store(sim_ptr + rows[:, None] * num + out, score, mask=keep)
        upper = tl.min(state, axis=1)


def _check_range(name: str, tensor: torch.Tensor, low: int, high: int) -> None:
    if tensor.numel() == 0:
        return
    lo, hi = int(tensor.min()), int(tensor.max())
    if lo < low or hi >= high:
        raise RuntimeError(f"{OP}: {name} values should lie in [{low}, {high}), got min {lo} and max {hi}")


def _check_inputs(q, k, num, pos, q_group, k_group, exclude_self, max_sim, margin, skip) -> None:
    """The C++ kernel's checks, with its messages (RuntimeError)."""
    for name, tensor in (("q", q), ("k", k)):
        if tensor.dim() != 2:
            raise RuntimeError(
                f"{OP}: {name} should be a 2-D tensor, got {tensor.dim()}-D with shape {list(tensor.shape)}"
            )
    if not q.is_floating_point() or k.dtype != q.dtype:
        raise RuntimeError(f"{OP}: q and k should share a floating dtype, got {q.dtype} and {k.dtype}")
    if k.shape[1] != q.shape[1]:
        raise RuntimeError(f"{OP}: k.shape[1] should equal q.shape[1] = {q.shape[1]}, got shape {list(k.shape)}")
    n, m = q.shape[0], k.shape[0]
    check_mining_options(n, m, num, skip, exclude_self, max_sim, margin, pos is not None, error=RuntimeError)
    if (q_group is None) != (k_group is None):
        given = "q_group" if q_group is not None else "k_group"
        raise RuntimeError(f"{OP}: q_group and k_group should be given together, got only {given}")
    for name, tensor, length, what in (
        ("pos", pos, n, "q.shape[0]"),
        ("q_group", q_group, n, "q.shape[0]"),
        ("k_group", k_group, m, "k.shape[0]"),
    ):
        if tensor is None:
            continue
        if tensor.dim() != 1 or tensor.dtype != torch.int64:
            raise RuntimeError(
                f"{OP}: {name} should be a 1-D int64 tensor, got {tensor.dtype} of shape {list(tensor.shape)}"
            )
        if tensor.shape[0] != length:
            raise RuntimeError(f"{OP}: {name}.shape[0] should equal {what} = {length}, got shape {list(tensor.shape)}")
        if tensor.device != q.device:
            raise RuntimeError(f"{OP}: {name} is on {tensor.device} but q is on {q.device}")
    if pos is not None:
        _check_range("pos", pos, -1, m)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def launch_config(total: int, dtype: torch.dtype, interpreted: bool = False) -> dict:
    """Block sizes and warps of the mining kernel for ``num + skip = total`` (>= 1) and ``dtype``.

    The selection holds a power of two in [STATE_MIN, STATE_MAX] entries per row (a few spare
    entries cost nothing and halve the configurations to compile)."""
    state = min(max(triton.next_power_of_2(total), STATE_MIN), STATE_MAX)
    return {
        "BLOCK_N": INTERPRETER_BLOCK_N if interpreted else BLOCK_N,
        "BLOCK_M": 32 if state <= 32 else 64,
        "BLOCK_D": BLOCK_D,
        "STATE": state,
        "num_warps": 8 if state >= 128 or dtype == torch.float64 else 4,
        "num_stages": 1,
        # ptxas otherwise caps 8-warp kernels at 128 registers and spills (fp32, STATE 128).
        "maxnreg": 255,
    }


TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def _aot_configs() -> list[dict]:
    """Every (dtype, precision, STATE) the GPU path launches, as ``triton.compile`` inputs (the
    query pointer is named ``Q``, where ``scripts/check_triton_aot.py`` reads the dtype)."""
    configs = []
    for dtype, name in TRITON_DTYPES.items():
        acc = "fp64" if dtype == torch.float64 else "fp32"
        for precision in ("ieee", "tf32") if dtype == torch.float32 else ("ieee",):
            for log_state in range(STATE_MIN.bit_length() - 1, STATE_MAX.bit_length()):
                config = launch_config(2**log_state, dtype)
                num_warps, num_stages = config.pop("num_warps"), config.pop("num_stages")
                maxnreg = config.pop("maxnreg")
                signature = {
                    "Q": f"*{name}", "K": f"*{name}", "pos_ptr": "*i64", "q_group_ptr": "*i64",
                    "k_group_ptr": "*i64", "bounds_ptr": f"*{acc}", "idx_ptr": "*i64", "sim_ptr": "*fp32",
                    **dict.fromkeys(["N", "M", "D", "num", "skip", "sweeps", "stride_q", "stride_k"], "i32"),
                    **dict.fromkeys(["has_pos", "has_group", "exclude_self", "has_max_sim", "has_margin"], "i32"),
                }  # fmt: skip
                constexprs = {
                    "ACC": tl.float64 if acc == "fp64" else tl.float32,
                    "UPCAST": False,
                    "PRECISION": precision,
                    **config,
                }
                signature.update(dict.fromkeys(constexprs, "constexpr"))
                configs.append(
                    {
                        "kernel": _mine_kernel,
                        "signature": signature,
                        "constexprs": constexprs,
                        "num_warps": num_warps,
                        "num_stages": num_stages,
                        "maxnreg": maxnreg,
                    }
                )
    return configs


AOT_CONFIGS = _aot_configs()


def topk_hard_negatives(
    q: torch.Tensor,
    k: torch.Tensor,
    num: int,
    pos: torch.Tensor | None = None,
    q_group: torch.Tensor | None = None,
    k_group: torch.Tensor | None = None,
    exclude_self: bool = False,
    max_sim: float | None = None,
    margin: float | None = None,
    skip: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel of ``mgccl::topk_hard_negatives`` (CONTRACTS.md schema).

    q [N, D], k [M, D] -> idx [N, num] int64, sim [N, num] float32: per row the allowed keys of
    ranks [skip, skip + num) by similarity descending, ties to the smaller index; -1 / -inf pad.
    The trailing options default so that the older six-argument schema calls it too.
    """
    _check_inputs(q, k, num, pos, q_group, k_group, exclude_self, max_sim, margin, skip)
    n, m, d = q.shape[0], k.shape[0], q.shape[1]
    idx = torch.full((n, num), -1, dtype=torch.int64, device=q.device)
    sim = torch.full((n, num), float("-inf"), dtype=torch.float32, device=q.device)
    if n == 0 or num == 0 or m == 0:
        return idx, sim
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    total = min(num + skip, m)
    if skip >= m:
        return idx, sim
    config = launch_config(total, q.dtype, _interpreted())
    sweeps = triton.cdiv(total, config["STATE"])
    bounds = torch.tensor(
        [max_sim if max_sim is not None else 0.0, margin if margin is not None else 0.0], dtype=acc, device=q.device
    )
    q_c, k_c = q.detach().contiguous(), k.detach().contiguous()
    dummy = idx  # never read: its HAS_* flag is off
    precision = "tf32" if q.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    _mine_kernel[(triton.cdiv(n, config["BLOCK_N"]),)](
        q_c,
        k_c,
        pos.contiguous() if pos is not None else dummy,
        q_group.contiguous() if q_group is not None else dummy,
        k_group.contiguous() if k_group is not None else dummy,
        bounds,
        idx,
        sim,
        n,
        m,
        d,
        num,
        skip,
        sweeps,
        q_c.stride(0),
        k_c.stride(0),
        int(pos is not None),
        int(q_group is not None),
        int(bool(exclude_self)),
        int(max_sim is not None),
        int(margin is not None),
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        UPCAST=_interpreted(),
        PRECISION=precision,
        **config,
    )
    return idx, sim
