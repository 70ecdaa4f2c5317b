"""Triton kernels of the fused similarity + contrastive loss (DESIGN.md op 1).

Notation: q [N, D], k [M, D], logits ``s_ij = scale * <q_i, k_j>``, row log-sum-exp
``lse_i = logsumexp_j s_ij`` and, when symmetric, column log-sum-exp ``clse_j = logsumexp_i s_ij``.
The gradient of the loss with respect to the logits is

    G_ij = c_i exp(s_ij - lse_i) - c_i [j == pos_i]                                  (one-sided)
    G_ij = (c_i exp(s_ij - lse_i) + c'_j exp(s_ij - clse_j)) / 2 - c_i [j == pos_i]   (symmetric)

with c_i the weight of row i's loss in the reduction (0 on ignored rows) and ``c'_pos_i = c_i``.
Then ``dq = scale * G k``, ``dk = scale * G^T q`` and ``dscale = sum_ij G_ij <q_i, k_j>``.

Kernels (every one tiles q against k with ``tl.dot`` in the input dtype, fp32 accumulation,
fp64 for fp64 inputs; fp32 inputs in IEEE fp32 unless ``torch.backends.cuda.matmul.allow_tf32``):

- ``_row_lse_kernel``: one program per block of rows sweeps all key blocks with an online
  log-sum-exp, and picks the positive logit from the same tiles. The column log-sum-exp of the
  symmetric loss is the same kernel with q and k swapped: a second sweep. A one-sweep scheme
  would have to merge per-column partial (max, sum) pairs of every row block, which needs either
  atomics on pairs (not available) or [row blocks x M] partials (not O(N + M)); the second sweep
  costs one extra logit product out of six in a symmetric training step (forward 2, dq 2, dk 2).
- ``_grad_q_kernel``: one program per block of rows recomputes the logit tiles of its rows,
  forms G and adds ``G @ k`` into its own rows of dq, D chunk by D chunk (a program-private
  read-modify-write in an fp32 buffer, as Inf-CL does: dq rows never fit in registers for
  D up to 1024); it also sums ``G * <q, k>`` per row for dscale.
- ``_grad_k_kernel``: the same over blocks of keys for dk. No atomics anywhere: each output row
  is written by exactly one program, so the result is deterministic.

Memory beyond inputs, outputs and gradients: O(N + M) (log-sum-exps, positive logits, the
per-row coefficients c and the dscale partials) plus fp32 gradient buffers for 16-bit inputs;
never the N x M logits.

For 16-bit inputs the second product of the gradient kernels multiplies G in the input dtype
(tensor cores). G is first divided by max|c| so that its entries lie in [-1, 1] and do not
underflow float16 when c is as small as 1/N; the product is multiplied back in fp32.

Under ``TRITON_INTERPRET=1`` 16-bit operands are upcast to fp32 before every ``tl.dot`` (the
interpreter computes 16-bit products wrongly) and ``input_precision`` has no effect, so the
interpreter does not check the bf16/fp16 tensor-core path, TF32, or races between programs;
those run only on a GPU (``pytest -m gpu``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mgccl_ops.ops import contrastive as contrastive_op
from mgccl_ops.ops._dtypes import accumulation_dtype

OP = "contrastive_loss"


@triton.jit
def _dot_tile(
    Q,
    K,
    rows,
    cols,
    N,
    M,
    D,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """<q_i, k_j> of a [BLOCK_N, BLOCK_M] tile (0 outside [N, M]), over D in masked chunks."""
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC)
    q_rows = Q + rows.to(tl.int64)[:, None] * D
    k_cols = K + cols.to(tl.int64)[None, :] * D
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        q = tl.load(q_rows + dims[None, :], mask=(rows[:, None] < N) & (dims[None, :] < D), other=0.0)
        kt = tl.load(k_cols + dims[:, None], mask=(cols[None, :] < M) & (dims[:, None] < D), other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            kt = kt.to(tl.float32)
        acc = tl.dot(q, kt, acc, input_precision=PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def _row_lse_kernel(
    Q,
    K,
    POS,
    SCALE,
    LSE,
    POS_LOGIT,
    N,
    M,
    D,
    HAS_POS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """LSE[i] = logsumexp_j s_ij for a block of rows; with HAS_POS also POS_LOGIT[i] = s_i,pos[i]."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    scale = tl.load(SCALE)
    run_max = tl.full([BLOCK_N], float("-inf"), ACC)
    run_sum = tl.zeros([BLOCK_N], dtype=ACC)
    pos_logit = tl.zeros([BLOCK_N], dtype=ACC)
    if HAS_POS:
        pos = tl.load(POS + rows, mask=row_ok, other=-1)
    for c0 in range(0, M, BLOCK_M):
        cols = c0 + tl.arange(0, BLOCK_M)
        s = _dot_tile(Q, K, rows, cols, N, M, D, BLOCK_N, BLOCK_M, BLOCK_D, ACC, PRECISION, UPCAST) * scale
        s = tl.where(cols[None, :] < M, s, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(s, 1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(s - new_max[:, None]), 1)
        run_max = new_max
        if HAS_POS:
            pos_logit += tl.sum(tl.where(cols[None, :] == pos[:, None], s, 0.0), 1)
    tl.store(LSE + rows, run_max + tl.log(run_sum), mask=row_ok)
    if HAS_POS:
        tl.store(POS_LOGIT + rows, pos_logit, mask=row_ok)


@triton.jit
def _logit_gradient(s, row_ok, col_ok, cols, pos, lse, c, clse, c_col, SYMMETRIC: tl.constexpr):
    """G (see the module docstring) of a [BLOCK_N, BLOCK_M] tile of logits s; 0 outside [N, M]."""
    g = c[:, None] * tl.exp(s - lse[:, None])
    if SYMMETRIC:
        g = 0.5 * (g + c_col[None, :] * tl.exp(s - clse[None, :]))
    g = g - tl.where(cols[None, :] == pos[:, None], c[:, None], 0.0)
    return tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)


@triton.jit
def _product_operand(g, norm, K, UPCAST: tl.constexpr):
    """G as the left operand of the second product: in K's dtype for 16-bit inputs (scaled by norm)."""
    operand = g
    if K.dtype.element_ty == tl.float16 or K.dtype.element_ty == tl.bfloat16:
        operand = g * norm
        if not UPCAST:
            operand = operand.to(K.dtype.element_ty)
    return operand


@triton.jit
def _gradient_scales(SCALE, NORM, K):
    """(scale, norm, back): the logit scale, NORM[0] (G's scaling for 16-bit products, see
    _product_operand) and the factor each product is multiplied by, scale * NORM[1] (scale alone
    for 32- and 64-bit inputs)."""
    scale = tl.load(SCALE)
    norm = tl.load(NORM)
    back = scale * tl.load(NORM + 1)
    if not (K.dtype.element_ty == tl.float16 or K.dtype.element_ty == tl.bfloat16):
        back = scale
    return scale, norm, back


@triton.jit
def _row_terms(POS, ROW_LSE, C_ROW, rows, row_ok):
    """pos, row log-sum-exp and c of a block of rows [BLOCK_N] (-1, 0, 0 outside [0, N))."""
    pos = tl.load(POS + rows, mask=row_ok, other=-1)
    lse = tl.load(ROW_LSE + rows, mask=row_ok, other=0.0)
    c = tl.load(C_ROW + rows, mask=row_ok, other=0.0)
    return pos, lse, c


@triton.jit
def _column_terms(COL_LSE, C_COL, cols, col_ok, SYMMETRIC: tl.constexpr, BLOCK_M: tl.constexpr, ACC: tl.constexpr):
    """Column log-sum-exp and c_col of a block of columns [BLOCK_M] for the symmetric loss (0
    outside [0, M)); zeros when not SYMMETRIC (unused there)."""
    clse = tl.zeros([BLOCK_M], dtype=ACC)
    c_col = tl.zeros([BLOCK_M], dtype=ACC)
    if SYMMETRIC:
        clse = tl.load(COL_LSE + cols, mask=col_ok, other=0.0)
        c_col = tl.load(C_COL + cols, mask=col_ok, other=0.0)
    return clse, c_col


@triton.jit
def _add_product(
    g_op,
    SRC,
    src_rows,
    src_ok,
    DST,
    dst_rows,
    dst_ok,
    back,
    D,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """DST[dst_rows] += back * (g_op @ SRC[src_rows]) over D in masked chunks: g_op [B, S], rows
    src_rows [S] of SRC [., D] (0 where not src_ok), rows dst_rows [B] of DST [., D] (stored where
    dst_ok)."""
    src = SRC + src_rows.to(tl.int64)[:, None] * D
    dst = DST + dst_rows.to(tl.int64)[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        chunk = tl.load(src + dims[None, :], mask=src_ok[:, None] & (dims[None, :] < D), other=0.0)
        if UPCAST:
            chunk = chunk.to(tl.float32)
        part = tl.dot(g_op, chunk, input_precision=PRECISION, out_dtype=ACC)
        out = dst + dims[None, :]
        out_ok = dst_ok[:, None] & (dims[None, :] < D)
        tl.store(out, tl.load(out, mask=out_ok, other=0.0) + part * back, mask=out_ok)


@triton.jit
def _grad_q_kernel(
    Q,
    K,
    POS,
    SCALE,
    ROW_LSE,
    COL_LSE,
    C_ROW,
    C_COL,
    NORM,
    GRAD_Q,
    SCALE_PART,
    N,
    M,
    D,
    SYMMETRIC: tl.constexpr,
    WANT_Q: tl.constexpr,
    WANT_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """For a block of rows: GRAD_Q[i] += scale * sum_j G_ij k_j; SCALE_PART[i] = sum_j G_ij <q_i, k_j>.

    NORM = [1 / max|c|, max|c|] undoes the scaling of G for 16-bit products (see _product_operand).
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    scale, norm, back = _gradient_scales(SCALE, NORM, K)
    pos, lse, c = _row_terms(POS, ROW_LSE, C_ROW, rows, row_ok)
    scale_part = tl.zeros([BLOCK_N], dtype=ACC)
    for c0 in range(0, M, BLOCK_M):
        cols = c0 + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        clse, c_col = _column_terms(COL_LSE, C_COL, cols, col_ok, SYMMETRIC, BLOCK_M, ACC)
        dots = _dot_tile(Q, K, rows, cols, N, M, D, BLOCK_N, BLOCK_M, BLOCK_D, ACC, PRECISION, UPCAST)
        g = _logit_gradient(dots * scale, row_ok, col_ok, cols, pos, lse, c, clse, c_col, SYMMETRIC)
        if WANT_SCALE:
            scale_part += tl.sum(g * dots, 1)
        if WANT_Q:
            g_op = _product_operand(g, norm, K, UPCAST)
            _add_product(g_op, K, cols, col_ok, GRAD_Q, rows, row_ok, back, D, BLOCK_D, ACC, PRECISION, UPCAST)
    if WANT_SCALE:
        tl.store(SCALE_PART + rows, scale_part, mask=row_ok)


@triton.jit
def _grad_k_kernel(
    Q,
    K,
    POS,
    SCALE,
    ROW_LSE,
    COL_LSE,
    C_ROW,
    C_COL,
    NORM,
    GRAD_K,
    N,
    M,
    D,
    SYMMETRIC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """For a block of keys: GRAD_K[j] += scale * sum_i G_ij q_i."""
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < M
    scale, norm, back = _gradient_scales(SCALE, NORM, K)
    clse, c_col = _column_terms(COL_LSE, C_COL, cols, col_ok, SYMMETRIC, BLOCK_M, ACC)
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        pos, lse, c = _row_terms(POS, ROW_LSE, C_ROW, rows, row_ok)
        dots = _dot_tile(Q, K, rows, cols, N, M, D, BLOCK_N, BLOCK_M, BLOCK_D, ACC, PRECISION, UPCAST)
        g = _logit_gradient(dots * scale, row_ok, col_ok, cols, pos, lse, c, clse, c_col, SYMMETRIC)
        g_op = tl.trans(_product_operand(g, norm, K, UPCAST))
        _add_product(g_op, Q, rows, row_ok, GRAD_K, cols, col_ok, back, D, BLOCK_D, ACC, PRECISION, UPCAST)


# Launch configuration by input dtype: (BLOCK_N, BLOCK_M, BLOCK_D, num_warps, num_stages).
# Chosen so that no configuration spills on sm_80 or sm_90 (scripts/check_triton_aot.py).
LAUNCH = {
    torch.float16: (64, 64, 64, 4, 2),
    torch.bfloat16: (64, 64, 64, 4, 2),
    torch.float32: (64, 32, 16, 4, 1),
    torch.float64: (32, 32, 16, 4, 1),
}
# ptxas's own register target caps some of these kernels at 128 registers and spills; with 4
# warps a thread may use 255 without spilling (the register file holds 65536 per SM).
MAXNREG = 255
# Rows of q and k are padded to a multiple of ALIGN_ELEMENTS and start ALIGN_BYTES-aligned.
ALIGN_ELEMENTS, ALIGN_BYTES = 16, 16
TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def interpreting() -> bool:
    """Whether Triton runs on the interpreter (where 16-bit operands are upcast)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _precision(dtype: torch.dtype) -> str:
    """``input_precision`` of tl.dot: TF32 for fp32 inputs only where torch allows it for matmuls."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _meta(dtype: torch.dtype) -> dict:
    """Constexprs and launch options shared by the kernels for inputs of ``dtype``."""
    block_n, block_m, block_d, num_warps, num_stages = LAUNCH[dtype]
    return {
        "BLOCK_N": block_n,
        "BLOCK_M": block_m,
        "BLOCK_D": block_d,
        "ACC": tl.float64 if dtype == torch.float64 else tl.float32,
        "PRECISION": _precision(dtype),
        "UPCAST": interpreting() and dtype in (torch.float16, torch.bfloat16),
        "num_warps": num_warps,
        "num_stages": num_stages,
        "maxnreg": MAXNREG,
    }


def _aot_configs() -> list[dict]:
    """Every (kernel, signature, constexprs, num_warps, num_stages, maxnreg) the host code can launch.

    UPCAST is True only under the interpreter, which never compiles, so it is False here; fp32
    appears with both input precisions since ``allow_tf32`` is read at each call.
    """
    configs = []
    for dtype, (block_n, block_m, block_d, num_warps, num_stages) in LAUNCH.items():
        ptr, acc_ptr = f"*{TRITON_DTYPE[dtype]}", "*fp64" if dtype == torch.float64 else "*fp32"
        acc = tl.float64 if dtype == torch.float64 else tl.float32
        for precision in ("ieee", "tf32") if dtype == torch.float32 else ("ieee",):
            common = {"BLOCK_N": block_n, "BLOCK_M": block_m, "BLOCK_D": block_d, "ACC": acc}
            common.update(PRECISION=precision, UPCAST=False)
            sizes = {"N": "i32", "M": "i32", "D": "i32"}
            for has_pos in (True, False):
                signature = {"Q": ptr, "K": ptr, "POS": "*i64", "SCALE": acc_ptr, "LSE": acc_ptr}
                signature.update(POS_LOGIT=acc_ptr, **sizes)
                constexprs = dict(common, HAS_POS=has_pos)
                configs.append(_config(_row_lse_kernel, signature, constexprs, num_warps, num_stages))
            gradient_inputs = {"Q": ptr, "K": ptr, "POS": "*i64", "SCALE": acc_ptr, "ROW_LSE": acc_ptr}
            gradient_inputs.update(COL_LSE=acc_ptr, C_ROW=acc_ptr, C_COL=acc_ptr, NORM=acc_ptr)
            for symmetric in (False, True):
                for want_q, want_scale in ((True, True), (True, False), (False, True)):
                    signature = dict(gradient_inputs, GRAD_Q=acc_ptr, SCALE_PART=acc_ptr, **sizes)
                    constexprs = dict(common, SYMMETRIC=symmetric, WANT_Q=want_q, WANT_SCALE=want_scale)
                    configs.append(_config(_grad_q_kernel, signature, constexprs, num_warps, num_stages))
                signature = dict(gradient_inputs, GRAD_K=acc_ptr, **sizes)
                constexprs = dict(common, SYMMETRIC=symmetric)
                configs.append(_config(_grad_k_kernel, signature, constexprs, num_warps, num_stages))
    return configs


def _config(kernel, signature: dict, constexprs: dict, num_warps: int, num_stages: int) -> dict:
    full_signature = dict(signature, **{name: "constexpr" for name in constexprs})
    return {
        "kernel": kernel,
        "signature": full_signature,
        "constexprs": constexprs,
        "num_warps": num_warps,
        "num_stages": num_stages,
        "maxnreg": MAXNREG,
    }


AOT_CONFIGS = _aot_configs()


def _check_values(q, k, pos, scale, symmetric) -> None:
    """The value checks of the C++ kernels (same messages), with one device sync.

    Skipped while a CUDA graph is being captured, where no sync is allowed (the graph's first,
    uncaptured run is checked like any other call).
    """
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    m = k.shape[0]
    if pos.numel() == 0:
        finite = bool(torch.isfinite(scale))
        if not finite:
            raise RuntimeError(f"{OP}: scale should be finite, got {scale.item()}")
        return
    low, high = pos.aminmax()
    repeats = torch.zeros((), dtype=torch.int64, device=pos.device)
    if symmetric:
        counts = torch.zeros(max(m, 1), dtype=torch.int64, device=pos.device)
        counts.index_add_(0, pos.clamp(0, max(m - 1, 0)), torch.ones_like(pos))
        repeats = (counts > 1).sum()
    scale_value, low, high, repeats = torch.stack(
        [scale.detach().to(torch.float64), low.double(), high.double(), repeats.double()]
    ).tolist()
    if scale_value != scale_value or scale_value in (float("inf"), float("-inf")):
        raise RuntimeError(f"{OP}: scale should be finite, got {scale_value}")
    lowest = 0 if symmetric else -1
    if low < lowest or high >= m:
        raise RuntimeError(f"{OP}: pos values should lie in [{lowest}, {m}), got min {int(low)} and max {int(high)}")
    if repeats:
        raise RuntimeError(f"{OP}: symmetric=True needs pos to be a permutation of 0..M-1, got repeated values")


def _row_lse(q, k, pos, scale_acc, acc) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row log-sum-exp [N] and, when ``pos`` is given, positive logits [N] (zeros when M == 0)."""
    n, m, d = q.shape[0], k.shape[0], q.shape[1]
    lse = torch.zeros(n, dtype=acc, device=q.device)
    pos_logit = torch.zeros(n if pos is not None else 0, dtype=acc, device=q.device)
    if n == 0 or m == 0:
        return lse, pos_logit
    meta = _meta(q.dtype)
    grid = (triton.cdiv(n, meta["BLOCK_N"]),)
    has_pos = pos is not None
    if not has_pos:  # unused pointers of the right type
        pos, pos_logit = torch.zeros(1, dtype=torch.int64, device=q.device), lse
    _row_lse_kernel[grid](q, k, pos, scale_acc, lse, pos_logit, n, m, d, HAS_POS=has_pos, **meta)
    if not has_pos:
        pos_logit = lse.new_empty(0)
    return lse, pos_logit


def _gradients(q, k, pos, scale, scale_acc, c_rows, row_lse, col_lse, symmetric, grad_mask, d_out):
    """(grad_q [N, d_out], grad_k [M, d_out], grad_scale []) of sum_i c_i * loss_i; [0] where not asked for.

    q, k are the padded [N, D'], [M, D'] of _prepare; ``c_rows`` [N] is already 0 on ignored
    rows; ``row_lse`` [N] and ``col_lse`` [M] (symmetric) are complete log-sum-exps.
    """
    want_q, want_k, want_scale = grad_mask
    acc = scale_acc.dtype
    n, m, d = q.shape[0], k.shape[0], q.shape[1]
    grad_q = torch.zeros((n, d), dtype=acc, device=q.device) if want_q else None
    grad_k = torch.zeros((m, d), dtype=acc, device=q.device) if want_k else None
    scale_part = torch.zeros(n, dtype=acc, device=q.device) if want_scale else None
    if n > 0 and m > 0 and (want_q or want_k or want_scale):
        c_cols = torch.zeros(m, dtype=acc, device=q.device).index_copy_(0, pos, c_rows) if symmetric else c_rows
        col_lse = col_lse if symmetric else row_lse
        # G's entries are at most max|c| in size; 16-bit products take G / max|c|.
        c_max = c_rows.abs().max()
        c_max = torch.where(c_max > 0, c_max, torch.ones_like(c_max))
        norm = torch.stack([1 / c_max, c_max])
        meta = _meta(q.dtype)
        args = (q, k, pos, scale_acc, row_lse, col_lse, c_rows, c_cols, norm)
        if want_q or want_scale:
            grid = (triton.cdiv(n, meta["BLOCK_N"]),)
            out_q = grad_q if want_q else row_lse
            out_scale = scale_part if want_scale else row_lse
            _grad_q_kernel[grid](
                *args,
                out_q,
                out_scale,
                n,
                m,
                d,
                SYMMETRIC=symmetric,
                WANT_Q=want_q,
                WANT_SCALE=want_scale,
                **meta,
            )
        if want_k:
            grid = (triton.cdiv(m, meta["BLOCK_M"]),)
            _grad_k_kernel[grid](*args, grad_k, n, m, d, SYMMETRIC=symmetric, **meta)
    return (
        grad_q[:, :d_out].to(q.dtype).contiguous() if want_q else q.new_empty(0),
        grad_k[:, :d_out].to(q.dtype).contiguous() if want_k else q.new_empty(0),
        scale_part.sum().to(scale.dtype) if want_scale else scale.new_empty(0),
    )


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous with a 16-byte aligned start (the specialisation every launch relies on)."""
    t = t.contiguous()
    return t.clone() if t.data_ptr() % ALIGN_BYTES else t


def _padded(x: torch.Tensor) -> torch.Tensor:
    """x [R, D] as an aligned [R, D'] with D' = D rounded up to 16 (zero columns change no product)."""
    pad = -x.shape[1] % ALIGN_ELEMENTS
    return _aligned(torch.nn.functional.pad(x, (0, pad)) if pad else x)


def _prepare(q, k, pos, scale, symmetric):
    """Value checks; q, k padded to D' (a multiple of 16); pos aligned; scale as [1] in the acc dtype.

    Padding D costs a copy of q and k when D % 16 != 0, and keeps every load vectorisable: the
    kernels are compiled (and checked for spills) only for aligned rows.
    """
    _check_values(q, k, pos, scale, symmetric)
    acc = accumulation_dtype(q.dtype)
    scale_acc = scale.detach().to(acc).reshape(1)
    return _padded(q), _padded(k), _aligned(pos), scale_acc, acc


def contrastive_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    pos: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor | None,
    reduction: str,
    symmetric: bool,
    grad_mask: list[bool],
) -> tuple[torch.Tensor, ...]:
    """Kernel of ``torch.ops.mgccl.contrastive_loss`` (schema in csrc/mgccl_ops.cpp).

    Args:
        q: [N, D]; k: [M, D]; pos: [N] int64 (-1 ignores a row); scale: 0-dim tensor;
        weight: [N] or None; reduction: "mean", "sum" or "none"; symmetric: CLIP's two-sided
        loss (N == M, pos a permutation); grad_mask: which of (q, k, scale) want gradients.

    Returns:
        (loss [] or [N], row_lse [N], col_lse [M] if symmetric else [0], grad_q [N, D],
        grad_k [M, D], grad_scale []) in the accumulation dtype (gradients in the input dtype,
        grad_scale in scale's); the gradients of the loss for "mean"/"sum" where grad_mask asks,
        else [0].
    """
    contrastive_op.check_inputs(q, k, pos, scale, weight, reduction, symmetric)
    d = q.shape[1]
    q, k, pos, scale_acc, acc = _prepare(q, k, pos, scale, symmetric)
    n, m = q.shape[0], k.shape[0]
    valid = pos >= 0
    row_lse, pos_logit = _row_lse(q, k, pos, scale_acc, acc)
    col_lse = _row_lse(k, q, None, scale_acc, acc)[0] if symmetric else row_lse.new_empty(0)
    if m == 0:
        row_loss = torch.zeros(n, dtype=acc, device=q.device)
    else:
        row_loss = row_lse - pos_logit
        if symmetric:
            row_loss = 0.5 * (row_lse + col_lse[pos]) - pos_logit
        row_loss = torch.where(valid, row_loss, torch.zeros_like(row_loss))
    # Ignored rows never read their weight (docs/ops.md): exactly 0 there, even for NaN or inf.
    zero = torch.zeros((), dtype=acc, device=q.device)
    w = valid.to(acc) if weight is None else torch.where(valid, weight.to(acc), zero)
    if reduction == "none":
        loss = row_loss * w if weight is not None else row_loss
        c_rows = None
    elif reduction == "sum":
        c_rows = w
        loss = (row_loss * w).sum()
    else:
        # Divided by the signed total weight; exactly 0 (zero gradients) only when it is 0.
        total = w.sum()
        c_rows = torch.where((total != 0) & valid, w / total, zero)
        loss = torch.where(total != 0, (row_loss * c_rows).sum(), zero)
    if c_rows is None or not any(grad_mask):
        no_grads = (q.new_empty(0), k.new_empty(0), scale.new_empty(0))
        return (loss, row_lse, col_lse, *no_grads)
    grads = _gradients(q, k, pos, scale, scale_acc, c_rows, row_lse, col_lse, symmetric, grad_mask, d)
    return (loss, row_lse, col_lse, *grads)


def contrastive_loss_backward(
    row_grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    pos: torch.Tensor,
    scale: torch.Tensor,
    row_lse: torch.Tensor,
    col_lse: torch.Tensor,
    symmetric: bool,
    grad_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel of ``torch.ops.mgccl.contrastive_loss_backward``: gradients of sum_i row_grad[i] loss_i.

    Args:
        row_grad: [N] (already multiplied by the row weights); q, k, pos, scale as in the forward;
        row_lse [N], col_lse [M] (symmetric) or [0]: the forward's log-sum-exps.

    Returns:
        (grad_q [N, D], grad_k [M, D], grad_scale []), [0] where grad_mask does not ask.
    """
    contrastive_op.check_inputs(q, k, pos, scale, None, "mean", symmetric)
    d = q.shape[1]
    q, k, pos, scale_acc, acc = _prepare(q, k, pos, scale, symmetric)
    if row_grad.dim() != 1 or row_grad.shape[0] != q.shape[0]:
        raise ValueError(
            f"contrastive_loss_backward: row_grad should have shape [N] = [{q.shape[0]}], got {tuple(row_grad.shape)}"
        )
    c_rows = torch.where(pos >= 0, row_grad.to(acc), torch.zeros((), dtype=acc, device=row_grad.device))
    row_lse, col_lse = _aligned(row_lse.to(acc)), _aligned(col_lse.to(acc))
    return _gradients(q, k, pos, scale, scale_acc, c_rows, row_lse, col_lse, symmetric, grad_mask, d)
