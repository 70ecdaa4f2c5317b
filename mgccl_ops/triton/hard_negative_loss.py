"""Triton kernels of the hard-negative contrastive loss (DESIGN.md op 3).

Row i has E = K + 1 entries: entry 0 is its positive ``pos[i]``, entries 1..K its listed
negatives ``neg_idx[i]`` (-1 entries and rows with ``pos[i] = -1`` are not listed). Its logits are
indexed dot products ``scale * <q_i, k_key(i, c)>``: a program loads the key rows it needs chunk
by chunk of D straight from ``k`` (a [BLOCK_R, BLOCK_E, BLOCK_D] register tile), so the [N, K, D]
gathered keys never exist in memory. Working memory is O(N * E): the dot products, overwritten by
the logit coefficients ``G[i, c] = c_i * (softmax_c - [c == 0])``.

- ``_rows_kernel``: per block of rows, pass 1 stores the dot products and keeps an online
  log-sum-exp over entry chunks (any K), pass 2 turns them into G and the per-row share of
  ``grad_scale``, pass 3 forms ``grad_q[i] = scale * sum_c G[i, c] k_key(i, c)`` chunk by chunk of D.
- ``_key_grad_kernel``: ``grad_k[j] = scale * sum over entries (i, c) naming j of G[i, c] q_i``.
  The entries are sorted by key beforehand (a stable ``torch.sort``, O(N * E)), so the entries of
  a block of BLOCK_J keys are one contiguous run; the program sums the run in order, scattering
  each entry to its key by a one-hot ``tl.dot`` (exact 0/1 weights, IEEE precision). No atomics:
  **grad_k is deterministic** (the same bits on every run for a given launch configuration),
  duplicates included.

Everything is computed in fp32 (fp64 for fp64 inputs); bf16/fp16 inputs are loaded and
up-cast, so the interpreter computes what the GPU computes. Gradients return in the input dtype.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

OP = "hard_negative_loss"
BLOCK_J = 16  # keys per program of the key-gradient kernel
BLOCK_S = 32  # sorted entries per step of the key-gradient kernel
KEY_BLOCK_D = 64  # D chunk of the key-gradient kernel
ROW_BLOCK_D = 32  # D chunk of the row kernel
ROW_TILE = 2048  # elements of the row kernel's [BLOCK_R, BLOCK_E, BLOCK_D] gather tile (64-bit pointers each)


@triton.jit
def _entry_keys(pos_ptr, neg_ptr, rows, row_ok, ents, num_neg):
    """Key of each (row, entry) [BLOCK_R, BLOCK_E] and whether it is listed."""
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=-1)
    neg_ok = row_ok[:, None] & (ents[None, :] >= 1) & (ents[None, :] <= num_neg)
    neg = tl.load(neg_ptr + rows[:, None] * num_neg + (ents[None, :] - 1), mask=neg_ok, other=-1)
    key = tl.where(ents[None, :] == 0, pos[:, None], neg)
    listed = (pos[:, None] >= 0) & (key >= 0) & (ents[None, :] <= num_neg) & row_ok[:, None]
    return key, listed


@triton.jit
def _rows_kernel(
    Q,
    K,
    pos_ptr,
    neg_ptr,
    scale_ptr,
    coef_ptr,
    row_loss_ptr,
    g_ptr,
    grad_q_ptr,
    scale_part_ptr,
    N,
    D,
    num_neg,
    stride_q,
    stride_k,
    grads,
    want_grad_q,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """row_loss [N]; with grads also G [N, E] (coefficients coef [N]), the per-row share of
    grad_scale [N] and, with want_grad_q, grad_q [N, D]. g_ptr holds the dot products meanwhile."""
    E = num_neg + 1
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    offs_e = tl.arange(0, BLOCK_E)
    offs_d = tl.arange(0, BLOCK_D)
    scale = tl.load(scale_ptr).to(ACC)
    q_rows = Q + rows[:, None] * stride_q

    # Pass 1: dot products (stored) and the online log-sum-exp of the listed logits.
    run_max = tl.full([BLOCK_R], float("-inf"), ACC)
    run_sum = tl.zeros([BLOCK_R], ACC)
    pos_dot = tl.zeros([BLOCK_R], ACC)
    for e0 in range(0, E, BLOCK_E):
        ents = e0 + offs_e
        key, listed = _entry_keys(pos_ptr, neg_ptr, rows, row_ok, ents, num_neg)
        k_rows = K + tl.where(listed, key, 0)[:, :, None] * stride_k
        dots = tl.zeros([BLOCK_R, BLOCK_E], ACC)
        for d0 in range(0, D, BLOCK_D):
            d_ok = (d0 + offs_d) < D
            qd = tl.load(q_rows + (d0 + offs_d)[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            kd = tl.load(
                k_rows + (d0 + offs_d)[None, None, :], mask=listed[:, :, None] & d_ok[None, None, :], other=0.0
            )
            dots += tl.sum(qd.to(ACC)[:, None, :] * kd.to(ACC), axis=2)
        tl.store(g_ptr + rows[:, None] * E + ents[None, :], dots, mask=row_ok[:, None] & (ents[None, :] < E))
        pos_dot += tl.sum(tl.where(ents[None, :] == 0, dots, 0.0), axis=1)
        logits = tl.where(listed, scale * dots, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(logits - shift[:, None]), axis=1)
        run_max = new_max
    has_pos = tl.load(pos_ptr + rows, mask=row_ok, other=-1) >= 0
    lse = tl.where(has_pos, run_max + tl.log(tl.where(has_pos, run_sum, 1.0)), 0.0)  # ignored rows: 0
    tl.store(row_loss_ptr + rows, tl.where(has_pos, lse - scale * pos_dot, 0.0), mask=row_ok)

    if grads != 0:
        # Pass 2: coefficients G and the per-row share of grad_scale, sum_c G * dot.
        coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0).to(ACC)
        scale_part = tl.zeros([BLOCK_R], ACC)
        for e0 in range(0, E, BLOCK_E):
            ents = e0 + offs_e
            key, listed = _entry_keys(pos_ptr, neg_ptr, rows, row_ok, ents, num_neg)
            in_row = row_ok[:, None] & (ents[None, :] < E)
            dots = tl.load(g_ptr + rows[:, None] * E + ents[None, :], mask=in_row, other=0.0)
            softmax = tl.exp(scale * dots - lse[:, None])
            g = tl.where(listed, coef[:, None] * (softmax - (ents[None, :] == 0).to(ACC)), 0.0)
            scale_part += tl.sum(g * dots, axis=1)
            tl.store(g_ptr + rows[:, None] * E + ents[None, :], g, mask=in_row)
        tl.store(scale_part_ptr + rows, scale_part, mask=row_ok)

        if want_grad_q != 0:
            # Pass 3: grad_q = scale * sum_c G[i, c] k_key(i, c), chunk by chunk of D.
            for d0 in range(0, D, BLOCK_D):
                d_ok = (d0 + offs_d) < D
                acc = tl.zeros([BLOCK_R, BLOCK_D], ACC)
                for e0 in range(0, E, BLOCK_E):
                    ents = e0 + offs_e
                    key, listed = _entry_keys(pos_ptr, neg_ptr, rows, row_ok, ents, num_neg)
                    g = tl.load(g_ptr + rows[:, None] * E + ents[None, :], mask=listed, other=0.0)
                    kd = tl.load(
                        K + tl.where(listed, key, 0)[:, :, None] * stride_k + (d0 + offs_d)[None, None, :],
                        mask=listed[:, :, None] & d_ok[None, None, :],
                        other=0.0,
                    )
                    acc += tl.sum(g[:, :, None] * kd.to(ACC), axis=1)
                tl.store(
                    grad_q_ptr + rows[:, None] * D + (d0 + offs_d)[None, :],
                    (scale * acc).to(grad_q_ptr.dtype.element_ty),
                    mask=row_ok[:, None] & d_ok[None, :],
                )


@triton.jit
def _key_grad_kernel(
    Q,
    g_ptr,
    scale_ptr,
    sorted_key_ptr,
    order_ptr,
    start_ptr,
    grad_k_ptr,
    M,
    D,
    E,
    stride_q,
    ACC: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """grad_k [M, D] for keys [j0, j0 + BLOCK_J): their entries are the run
    [start[j0], start[min(j0 + BLOCK_J, M)]) of the entries sorted by key (order [N * E], the
    entry ids; sorted_key [N * E], their keys)."""
    j0 = tl.program_id(0).to(tl.int64) * BLOCK_J
    keys = j0 + tl.arange(0, BLOCK_J)
    key_ok = keys < M
    run_start = tl.load(start_ptr + j0)
    run_end = tl.load(start_ptr + tl.minimum(j0 + BLOCK_J, M))
    scale = tl.load(scale_ptr).to(ACC)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + offs_d) < D
        acc = tl.zeros([BLOCK_J, BLOCK_D], ACC)
        for p0 in range(run_start, run_end, BLOCK_S):
            p = p0 + offs_s
            p_ok = p < run_end
            entry = tl.load(order_ptr + p, mask=p_ok, other=0)
            key = tl.load(sorted_key_ptr + p, mask=p_ok, other=-1)
            g = tl.load(g_ptr + entry, mask=p_ok, other=0.0)
            qd = tl.load(
                Q + (entry // E)[:, None] * stride_q + (d0 + offs_d)[None, :],
                mask=p_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            share = g[:, None] * qd.to(ACC)  # [BLOCK_S, BLOCK_D]
            one_hot = (keys[:, None] == key[None, :]).to(ACC)  # [BLOCK_J, BLOCK_S]
            acc = tl.dot(one_hot, share, acc, input_precision="ieee", out_dtype=ACC)
        tl.store(
            grad_k_ptr + keys[:, None] * D + (d0 + offs_d)[None, :],
            (scale * acc).to(grad_k_ptr.dtype.element_ty),
            mask=key_ok[:, None] & d_ok[None, :],
        )


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def row_config(entries: int, d: int, interpreted: bool = False) -> dict:
    """Block sizes of ``_rows_kernel`` for E = K + 1 entries per row and width D (any K and D:
    the kernel loops over entry and D chunks). On the GPU the [R, E, D] register tile holds
    ROW_TILE elements; under the interpreter wider row blocks cut the number of programs."""
    block_e = 8 if entries <= 8 else 32
    return {
        "BLOCK_R": 128 if interpreted else ROW_TILE // (block_e * ROW_BLOCK_D),
        "BLOCK_E": block_e,
        "BLOCK_D": ROW_BLOCK_D,
        "num_warps": 4,
        "num_stages": 1,
    }


def key_config() -> dict:
    """Block sizes of ``_key_grad_kernel``."""
    return {"BLOCK_J": BLOCK_J, "BLOCK_S": BLOCK_S, "BLOCK_D": KEY_BLOCK_D, "num_warps": 4, "num_stages": 1}


TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def _aot_configs() -> list[dict]:
    """Every configuration the GPU path launches, as ``triton.compile`` inputs (the query pointer
    is named ``Q``, where ``scripts/check_triton_aot.py`` reads the dtype)."""
    configs = []
    for dtype, name in TRITON_DTYPES.items():
        acc = "fp64" if dtype == torch.float64 else "fp32"
        acc_tl = tl.float64 if dtype == torch.float64 else tl.float32
        launches = [(_rows_kernel, row_config(entries, 64)) for entries in (8, 32)] + [(_key_grad_kernel, key_config())]
        for kernel, config in launches:
            num_warps, num_stages = config.pop("num_warps"), config.pop("num_stages")
            if kernel is _rows_kernel:
                signature = {
                    "Q": f"*{name}", "K": f"*{name}", "pos_ptr": "*i64", "neg_ptr": "*i64",
                    "scale_ptr": f"*{acc}", "coef_ptr": f"*{acc}", "row_loss_ptr": f"*{acc}", "g_ptr": f"*{acc}",
                    "grad_q_ptr": f"*{name}", "scale_part_ptr": f"*{acc}",
                    **dict.fromkeys(["N", "D", "num_neg", "stride_q", "stride_k", "grads", "want_grad_q"], "i32"),
                }  # fmt: skip
            else:
                signature = {
                    "Q": f"*{name}", "g_ptr": f"*{acc}", "scale_ptr": f"*{acc}", "sorted_key_ptr": "*i64",
                    "order_ptr": "*i64", "start_ptr": "*i64", "grad_k_ptr": f"*{name}",
                    **dict.fromkeys(["M", "D", "E", "stride_q"], "i32"),
                }  # fmt: skip
            constexprs = {"ACC": acc_tl, **config}
            signature.update(dict.fromkeys(constexprs, "constexpr"))
            configs.append(
                {
                    "kernel": kernel,
                    "signature": signature,
                    "constexprs": constexprs,
                    "num_warps": num_warps,
                    "num_stages": num_stages,
                }
            )
    return configs


AOT_CONFIGS = _aot_configs()


def _check_range(name: str, tensor: torch.Tensor, low: int, high: int) -> None:
    if tensor.numel() == 0:
        return
    lo, hi = int(tensor.min()), int(tensor.max())
    if lo < low or hi >= high:
        raise RuntimeError(f"{OP}: {name} values should lie in [{low}, {high}), got min {lo} and max {hi}")


def _check_inputs(q, k, pos, neg_idx, scale) -> None:
    """The C++ kernel's checks, with its messages (RuntimeError)."""
    for name, tensor, dim in (("q", q, 2), ("k", k, 2), ("pos", pos, 1), ("neg_idx", neg_idx, 2)):
        if tensor.dim() != dim:
            raise RuntimeError(
                f"{OP}: {name} should be a {dim}-D tensor, got {tensor.dim()}-D with shape {list(tensor.shape)}"
            )
    if not q.is_floating_point() or k.dtype != q.dtype:
        raise RuntimeError(f"{OP}: q and k should share a floating dtype, got {q.dtype} and {k.dtype}")
    if k.shape[1] != q.shape[1]:
        raise RuntimeError(f"{OP}: k.shape[1] should equal q.shape[1] = {q.shape[1]}, got shape {list(k.shape)}")
    for name, tensor in (("pos", pos), ("neg_idx", neg_idx)):
        if tensor.shape[0] != q.shape[0]:
            raise RuntimeError(
                f"{OP}: {name}.shape[0] should equal q.shape[0] = {q.shape[0]}, got shape {list(tensor.shape)}"
            )
        if tensor.dtype != torch.int64:
            raise RuntimeError(f"{OP}: {name} should be int64, got {tensor.dtype}")
    for name, tensor in (("k", k), ("pos", pos), ("neg_idx", neg_idx), ("scale", scale)):
        if tensor.device != q.device:
            raise RuntimeError(f"{OP}: {name} is on {tensor.device} but q is on {q.device}")
    if scale.dim() != 0:
        raise RuntimeError(f"{OP}: scale should be a 0-dim tensor, got shape {list(scale.shape)}")
    if not bool(torch.isfinite(scale)):
        raise RuntimeError(f"{OP}: scale should be finite, got {float(scale)}")
    _check_range("pos", pos, -1, k.shape[0])
    _check_range("neg_idx", neg_idx, -1, k.shape[0])


def _gradients(q, k, pos, neg_idx, scale, coef, grad_mask):
    """(row_loss [N], grad_q, grad_k, grad_scale) of sum_i coef[i] * loss_i; unrequested gradients
    are empty [0] tensors as in the schema."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    n, d = q.shape
    m = k.shape[0]
    entries = neg_idx.shape[1] + 1
    want_q, want_k, want_scale = grad_mask
    grads = coef is not None
    q_c, k_c = q.detach().contiguous(), k.detach().contiguous()
    pos_c, neg_c = pos.contiguous(), neg_idx.contiguous()
    scale_c = scale.detach().reshape(1).to(acc)
    row_loss = torch.zeros(n, dtype=acc, device=q.device)
    g = torch.empty((n, entries), dtype=acc, device=q.device)
    grad_q = torch.empty_like(q_c) if grads and want_q else q.new_empty((0,))
    scale_part = torch.zeros(n, dtype=acc, device=q.device)
    if n > 0 and m > 0:
        config = row_config(entries, d, _interpreted())
        _rows_kernel[(triton.cdiv(n, config["BLOCK_R"]),)](
            q_c, k_c, pos_c, neg_c, scale_c, coef if grads else row_loss, row_loss, g,
            grad_q if grads and want_q else q_c, scale_part, n, d, entries - 1, q_c.stride(0), k_c.stride(0),
            int(grads), int(grads and want_q), ACC=tl.float64 if acc == torch.float64 else tl.float32,
            **config,
        )  # fmt: skip
    elif grads and want_q:
        grad_q.zero_()
    if not grads:
        return row_loss, None, None, None

    grad_k = k.new_empty((0,))
    if want_k:
        grad_k = torch.zeros_like(k_c)
        if n > 0 and m > 0:
            keys = torch.cat([pos_c[:, None], neg_c], dim=1)
            listed = (pos_c[:, None] >= 0) & (keys >= 0)
            sorted_key, order = torch.sort(torch.where(listed, keys, m).reshape(-1), stable=True)
            start = torch.searchsorted(sorted_key, torch.arange(m + 1, device=q.device))
            config = key_config()
            _key_grad_kernel[(triton.cdiv(m, config["BLOCK_J"]),)](
                q_c, g, scale_c, sorted_key, order, start, grad_k, m, d, entries, q_c.stride(0),
                ACC=tl.float64 if acc == torch.float64 else tl.float32, **config,
            )  # fmt: skip
    grad_scale = scale_part.sum().to(scale.dtype) if want_scale else scale.new_empty((0,))
    return row_loss, grad_q, grad_k, grad_scale


def hard_negative_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    pos: torch.Tensor,
    neg_idx: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor | None,
    reduction: str,
    grad_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel of ``mgccl::hard_negative_loss``: (loss, row_loss, grad_q, grad_k, grad_scale).

    q [N, D], k [M, D], pos [N], neg_idx [N, K], scale []; loss 0-dim ("mean"/"sum") or [N]
    ("none"), row_loss [N] unweighted (0 for ignored rows). For "mean"/"sum" the gradients that
    grad_mask asks for come from the same launch (else empty [0]).
    """
    _check_inputs(q, k, pos, neg_idx, scale)
    if reduction not in ("mean", "sum", "none"):
        raise RuntimeError(f"{OP}: reduction should be 'mean', 'sum' or 'none', got '{reduction}'")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    valid = (pos >= 0).to(acc)
    if weight is not None:
        if weight.dim() != 1 or weight.shape[0] != q.shape[0]:
            raise RuntimeError(
                f"{OP}: weight.shape[0] should equal q.shape[0] = {q.shape[0]}, got shape {list(weight.shape)}"
            )
        w = weight.to(acc) * valid
    else:
        w = valid
    fused = reduction != "none" and any(grad_mask)
    if reduction == "mean":
        total_weight = w.sum()
        coef = torch.where(total_weight == 0, torch.zeros_like(w), w / total_weight)
    else:
        coef = w
    row_loss, grad_q, grad_k, grad_scale = _gradients(q, k, pos, neg_idx, scale, coef if fused else None, grad_mask)
    if not fused:
        grad_q, grad_k, grad_scale = q.new_empty((0,)), k.new_empty((0,)), scale.new_empty((0,))
    if reduction == "none":
        loss = row_loss * w if weight is not None else row_loss.clone()
    elif reduction == "sum":
        loss = (row_loss * w).sum()
    else:
        loss = (row_loss * coef).sum()
    return loss, row_loss, grad_q, grad_k, grad_scale


def hard_negative_loss_backward(
    row_grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    pos: torch.Tensor,
    neg_idx: torch.Tensor,
    scale: torch.Tensor,
    grad_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel of ``mgccl::hard_negative_loss_backward``: the gradients of
    ``sum_i row_grad[i] * loss_i`` (row_grad [N]), recomputing the logits; empty [0] where
    grad_mask does not ask."""
    _check_inputs(q, k, pos, neg_idx, scale)
    if row_grad.dim() != 1 or row_grad.shape[0] != q.shape[0]:
        raise RuntimeError(
            f"hard_negative_loss_backward: row_grad.shape[0] should equal q.shape[0] = {q.shape[0]}, "
            f"got shape {list(row_grad.shape)}"
        )
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    _, grad_q, grad_k, grad_scale = _gradients(q, k, pos, neg_idx, scale, row_grad.to(acc).contiguous(), grad_mask)
    return grad_q, grad_k, grad_scale
