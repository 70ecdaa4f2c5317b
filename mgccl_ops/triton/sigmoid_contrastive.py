"""Triton kernel of the pairwise-sigmoid (SigLIP) contrastive loss, forward and backward.

``sigmoid_contrastive_loss(q, k, scale, bias, grad_mask)`` has the argument list and return
tuple of ``torch.ops.mgccl.sigmoid_contrastive_loss``. With ``z_ij = scale <q_i, k_j> + bias``
and ``g_ij = sigmoid(z_ij) - [i == j]`` (N times dloss/dz_ij):

- a row pass over query blocks (grid: row blocks x D chunks) recomputes each [BLOCK_A, BLOCK_B]
  logits tile from the operands, accumulates ``g @ k`` for its D chunk (grad_q, and grad_scale as
  ``sum_i <q_i, (g k)_i>``) and, on the first D chunk, the loss terms and ``sum_ij g_ij``
  (grad_bias) per row block;
- when grad_k is asked for, the same kernel runs with the roles of q and k swapped (the pair
  (j, i) of the transposed problem has the same logit and the same ``g``).

Only per-block partial sums ([row blocks, D chunks, 3]) are written besides the gradients: the
N x M logits never exist. Under the interpreter (``TRITON_INTERPRET=1``) 16-bit operands are
upcast to fp32 before ``tl.dot`` (the interpreter's 16-bit dot is wrong); on the GPU they stay
in their dtype, and fp32 operands use IEEE (not TF32) products. ``AOT_CONFIGS`` lists every
configuration the launcher can pick (33); each compiles for sm_80 and sm_90 without register
spills (``scripts/check_triton_aot.py``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Per input dtype: (BLOCK_A rows of the operand whose gradient is accumulated, BLOCK_B rows of
# the other per logits tile, BLOCK_K reduction chunk, largest BLOCK_D gradient chunk, num_warps,
# num_stages); chosen so that no configuration spills registers on sm_80 or sm_90.
LAUNCH = {
    torch.float16: (64, 64, 32, 128, 8, 2),
    torch.bfloat16: (64, 64, 32, 128, 8, 2),
    torch.float32: (64, 32, 16, 64, 4, 1),
    torch.float64: (32, 32, 16, 32, 4, 1),
}
# ptxas's own register target caps some configurations at 128 registers and spills; a thread
# may use 255 without spilling at these warp counts.
MAXNREG = 255
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


@triton.jit
def _log1p_exp_neg_abs(z):
    """log(1 + exp(-|z|)), accurate where exp(-|z|) is tiny (log(1 + x) alone rounds it to 0)."""
    x = tl.exp(-tl.abs(z))
    return tl.where(x < 1e-4, x * (1.0 - 0.5 * x), tl.log(1.0 + x))


@triton.jit
def _sigmoid_pairs_kernel(
    Q,
    K,
    params_ptr,
    grad_ptr,
    partial_ptr,
    N,
    M,
    D,
    stride_q,
    stride_k,
    stride_grad,
    ACC: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WANT_GRAD: tl.constexpr,
    WANT_SUMS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One [BLOCK_A rows of Q] x [BLOCK_D chunk of D] block of ``grad = g @ K``, over all of K.

    Q [N, D] is the operand whose gradient is accumulated (the queries, or the keys in the
    grad_k pass) and K [M, D] the other; the positives are the pairs with equal row indices.

    params = (scale, bias, 1 / number of queries) in the accumulation dtype. partial[pid_a, pid_d]
    = (sum_i <Q_i, (g K)_i> over the chunk, sum of loss terms, sum of g); the last two only on D
    chunk 0 when WANT_SUMS. grad rows receive ``scale / (number of queries) * g @ K`` when WANT_GRAD.
    """
    pid_a = tl.program_id(0)
    pid_d = tl.program_id(1)
    num_d = tl.num_programs(1)
    rows = pid_a * BLOCK_A + tl.arange(0, BLOCK_A).to(tl.int64)
    row_ok = rows < N
    chunk = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    chunk_ok = chunk < D
    scale = tl.load(params_ptr)
    bias = tl.load(params_ptr + 1)
    inv_n = tl.load(params_ptr + 2)
    grad_acc = tl.zeros((BLOCK_A, BLOCK_D), dtype=ACC)
    loss_rows = tl.zeros((BLOCK_A,), dtype=ACC)
    g_rows = tl.zeros((BLOCK_A,), dtype=ACC)
    for b0 in range(0, M, BLOCK_B):
        cols = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        col_ok = cols < M
        dot = tl.zeros((BLOCK_A, BLOCK_B), dtype=ACC)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            a = tl.load(Q + rows[:, None] * stride_q + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(K + cols[:, None] * stride_k + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(ACC)
                b = b.to(ACC)
            dot += tl.dot(a, tl.trans(b), input_precision=PRECISION, out_dtype=ACC)
        z = scale * dot + bias
        positive = rows[:, None] == cols[None, :]
        inside = row_ok[:, None] & col_ok[None, :]
        g = tl.where(inside, tl.sigmoid(z) - tl.where(positive, 1.0, 0.0).to(ACC), 0.0)
        if WANT_SUMS:
            # -log sigmoid(y z) = max(-y z, 0) + log(1 + exp(-|z|)), y = +1 on positives, else -1.
            neg_yz = tl.where(positive, -z, z)
            term = tl.maximum(neg_yz, 0.0) + _log1p_exp_neg_abs(z)
            loss_rows += tl.sum(tl.where(inside, term, 0.0), axis=1)
            g_rows += tl.sum(g, axis=1)
        if WANT_GRAD:
            b_chunk = tl.load(
                K + cols[:, None] * stride_k + chunk[None, :],
                mask=col_ok[:, None] & chunk_ok[None, :],
                other=0.0,
            )
            if UPCAST:
                grad_acc += tl.dot(g, b_chunk.to(ACC), input_precision=PRECISION, out_dtype=ACC)
            else:
                grad_acc += tl.dot(g.to(b_chunk.dtype), b_chunk, input_precision=PRECISION, out_dtype=ACC)
    out = partial_ptr + (pid_a * num_d + pid_d) * 3
    if WANT_GRAD:
        a_chunk = tl.load(
            Q + rows[:, None] * stride_q + chunk[None, :], mask=row_ok[:, None] & chunk_ok[None, :], other=0.0
        ).to(ACC)
        tl.store(out, tl.sum(tl.sum(a_chunk * grad_acc, axis=1), axis=0))
        grad = (grad_acc * (scale * inv_n)).to(grad_ptr.dtype.element_ty)
        tl.store(
            grad_ptr + rows[:, None] * stride_grad + chunk[None, :], grad, mask=row_ok[:, None] & chunk_ok[None, :]
        )
    # Every D chunk computed the same sums; chunk 0 writes them (a runtime test nested in a
    # compile-time one).
    if WANT_SUMS:  # noqa: SIM102
        if pid_d == 0:
            tl.store(out + 1, tl.sum(loss_rows, axis=0))
            tl.store(out + 2, tl.sum(g_rows, axis=0))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _block_d(dim: int, dtype: torch.dtype) -> int:
    """The D chunk of one program's gradient block: the next power of two of D, in [16, max]."""
    return min(LAUNCH[dtype][3], max(16, triton.next_power_of_2(max(dim, 1))))


def _launch(a, b, params, grad, want_grad: bool, want_sums: bool) -> torch.Tensor:
    """Runs the pair kernel for the rows of ``a`` against all of ``b``; returns partial [A, Dc, 3]."""
    block_a, block_b, block_k, _, num_warps, num_stages = LAUNCH[a.dtype]
    block_d = _block_d(a.shape[1], a.dtype)
    grid = (triton.cdiv(a.shape[0], block_a), max(1, triton.cdiv(a.shape[1], block_d)) if want_grad else 1)
    partial = torch.zeros(*grid, 3, dtype=params.dtype, device=a.device)
    _sigmoid_pairs_kernel[grid](
        a,
        b,
        params,
        grad,
        partial,
        a.shape[0],
        b.shape[0],
        a.shape[1],
        a.stride(0),
        b.stride(0),
        grad.stride(0),
        ACC=tl.float64 if params.dtype == torch.float64 else tl.float32,
        BLOCK_A=block_a,
        BLOCK_B=block_b,
        BLOCK_K=block_k,
        BLOCK_D=block_d,
        WANT_GRAD=want_grad,
        WANT_SUMS=want_sums,
        UPCAST=_interpreting() and a.dtype in (torch.float16, torch.bfloat16),
        PRECISION="ieee" if a.dtype in (torch.float32, torch.float64) else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
        maxnreg=MAXNREG,
    )
    return partial


def sigmoid_contrastive_loss(
    q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, grad_mask: list[bool]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The schema of ``torch.ops.mgccl.sigmoid_contrastive_loss``: q [N, D], k [M, D], 0-dim
    scale and bias -> (loss [], grad_q [N, D] | [0], grad_k [M, D] | [0], grad_scale [] | [0],
    grad_bias [] | [0]), the gradients of the loss where grad_mask asks for them."""
    for name, value in (("scale", scale), ("bias", bias)):
        if not torch.isfinite(value).item():
            raise RuntimeError(f"sigmoid_contrastive_loss: {name} should be finite, got {value.item()}")
    want_q, want_k, want_scale, want_bias = grad_mask
    n, m = q.shape[0], k.shape[0]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_c, k_c = q.contiguous(), k.contiguous()
    inv_n = torch.full((), 1.0 / n if n > 0 else 0.0, dtype=acc, device=q.device)
    params = torch.stack([scale.detach().to(acc), bias.detach().to(acc), inv_n])
    grad_q = torch.zeros_like(q_c) if want_q else q.new_empty(0)
    grad_k = torch.zeros_like(k_c) if want_k else q.new_empty(0)
    loss = torch.zeros((), dtype=acc, device=q.device)
    grad_scale = torch.zeros((), dtype=scale.dtype, device=q.device)
    grad_bias = torch.zeros((), dtype=bias.dtype, device=q.device)
    if n > 0 and m > 0:
        # grad_scale needs g @ k even when grad_q is not asked for: then into a scratch buffer.
        rows_grad = grad_q if want_q else (torch.empty_like(q_c) if want_scale else q_c)
        partial = _launch(q_c, k_c, params, rows_grad, want_q or want_scale, True)
        loss = partial[..., 1].sum() * inv_n
        grad_scale = (partial[..., 0].sum() * inv_n).to(scale.dtype)
        grad_bias = (partial[..., 2].sum() * inv_n).to(bias.dtype)
        if want_k:
            _launch(k_c, q_c, params, grad_k, True, False)
    return (
        loss,
        grad_q,
        grad_k,
        grad_scale if want_scale else scale.new_empty(0),
        grad_bias if want_bias else bias.new_empty(0),
    )


def _aot_config(dtype: torch.dtype, block_d: int, want_grad: bool, want_sums: bool) -> dict:
    block_a, block_b, block_k, _, num_warps, num_stages = LAUNCH[dtype]
    name, acc = DTYPES[dtype], "fp64" if dtype == torch.float64 else "fp32"
    return {
        "kernel": _sigmoid_pairs_kernel,
        "signature": {
            "Q": f"*{name}",
            "K": f"*{name}",
            "params_ptr": f"*{acc}",
            "grad_ptr": f"*{name}",
            "partial_ptr": f"*{acc}",
            "N": "i32",
            "M": "i32",
            "D": "i32",
            "stride_q": "i32",
            "stride_k": "i32",
            "stride_grad": "i32",
        },
        "constexprs": {
            "ACC": tl.float64 if dtype == torch.float64 else tl.float32,
            "BLOCK_A": block_a,
            "BLOCK_B": block_b,
            "BLOCK_K": block_k,
            "BLOCK_D": block_d,
            "WANT_GRAD": want_grad,
            "WANT_SUMS": want_sums,
            "UPCAST": False,  # True only under the interpreter, which never compiles
            "PRECISION": "ieee" if dtype in (torch.float32, torch.float64) else "tf32",
        },
        "num_warps": num_warps,
        "num_stages": num_stages,
        "maxnreg": MAXNREG,
    }


# Every configuration the launcher can pick on a GPU: dtype x BLOCK_D (16 up to the dtype's
# largest) x the three passes it runs: loss only, loss + gradient, gradient only (grad_k).
AOT_CONFIGS = [
    _aot_config(dtype, block_d, want_grad, want_sums)
    for dtype in (torch.float32, torch.float16, torch.bfloat16)
    for block_d in (16, 32, 64, 128)
    if block_d <= LAUNCH[dtype][3]
    for want_grad, want_sums in ((False, True), (True, True), (True, False))
]
