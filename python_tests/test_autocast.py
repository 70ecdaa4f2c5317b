"""Every op under ``torch.autocast`` on the CPU (bf16 and fp16): the rule of ``mgccl_ops/ops/autocast.py``.

The similarity ops cast ``q`` and ``k`` to the autocast dtype and run with autocast off, so
under autocast they equal the same op called outside autocast on inputs cast by hand, and the
gradients reach float32 leaves in float32. Region ops keep their input dtype. The GPU file
(``test_gpu_ops.py``) checks the same rules under CUDA autocast.
"""

from __future__ import annotations

import json

import pytest
import torch
from compare import assert_close

import mgccl_ops
from mgccl_ops import reference
from mgccl_ops.cli import main
from mgccl_ops.ops import autocast

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=-1)


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("amp", AUTOCAST_DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_contrastive_loss_casts_q_and_k_to_the_autocast_dtype(amp, reduction, symmetric):
    q32, k32 = unit_rows(37, 24, 0), unit_rows(37, 24, 1)
    pos = torch.randperm(37, generator=torch.Generator().manual_seed(2))
    weight = torch.rand(37, generator=torch.Generator().manual_seed(3)) + 0.5
    scale32 = torch.tensor(11.0)
    q, k, scale = leaves(q32, k32, scale32)
    with torch.autocast("cpu", dtype=amp):
        loss = mgccl_ops.contrastive_loss(
            q, k, pos, scale, weight=None if symmetric else weight, reduction=reduction, symmetric=symmetric
        )
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert q.grad.dtype == k.grad.dtype == torch.float32

    q_low, k_low, scale_ref = leaves(q32.to(amp), k32.to(amp), scale32)
    expected = mgccl_ops.contrastive_loss(
        q_low, k_low, pos, scale_ref, weight=None if symmetric else weight, reduction=reduction, symmetric=symmetric
    )
    expected.sum().backward()
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    torch.testing.assert_close(q.grad, q_low.grad.float(), rtol=0, atol=0)
    torch.testing.assert_close(k.grad, k_low.grad.float(), rtol=0, atol=0)
    torch.testing.assert_close(scale.grad, scale_ref.grad, rtol=0, atol=0)
    # And against the float32 reference within the tolerance of the autocast dtype.
    ref = reference.contrastive_loss(
        q32, k32, pos, scale32, weight=None if symmetric else weight, reduction=reduction, symmetric=symmetric
    )
    assert_close(loss / scale32, ref / scale32, amp, "loss / scale")


@pytest.mark.parametrize("amp", AUTOCAST_DTYPES)
def test_contrastive_loss_under_autocast_accepts_bf16_queries_against_a_float32_bank(amp):
    q32, k = unit_rows(9, 8, 4), unit_rows(13, 8, 5)
    pos = torch.arange(9)
    with torch.autocast("cpu", dtype=amp):
        mixed = mgccl_ops.contrastive_loss(q32.to(torch.bfloat16), k, pos, 5.0)
    expected = mgccl_ops.contrastive_loss(q32.to(torch.bfloat16).to(amp), k.to(amp), pos, 5.0)
    torch.testing.assert_close(mixed, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="k has dtype torch.float32 but q has dtype torch.bfloat16"):
        mgccl_ops.contrastive_loss(q32.to(torch.bfloat16), k, pos, 5.0)


def test_float64_inputs_are_not_cast_under_autocast():
    q, k = unit_rows(6, 5, 6).double(), unit_rows(7, 5, 7).double()
    pos = torch.tensor([0, 1, 2, -1, 4, 5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = mgccl_ops.contrastive_loss(q, k, pos, 3.0)
        idx_in, sim_in = mgccl_ops.topk_hard_negatives(q, k, 3, pos=pos)
    assert inside.dtype == torch.float64
    torch.testing.assert_close(inside, mgccl_ops.contrastive_loss(q, k, pos, 3.0), rtol=0, atol=0)
    idx_out, sim_out = mgccl_ops.topk_hard_negatives(q, k, 3, pos=pos)
    assert torch.equal(idx_in, idx_out) and torch.equal(sim_in, sim_out)


@pytest.mark.parametrize("amp", AUTOCAST_DTYPES)
def test_mining_and_hard_negative_loss_cast_q_and_k(amp):
    q32, k32 = unit_rows(21, 16, 8), unit_rows(33, 16, 9)
    gen = torch.Generator().manual_seed(10)
    pos = torch.randint(0, 33, (21,), generator=gen)
    q_group, k_group = torch.randint(0, 5, (21,), generator=gen), torch.randint(0, 5, (33,), generator=gen)
    q, k = leaves(q32, k32)
    with torch.autocast("cpu", dtype=amp):
        idx, sim = mgccl_ops.topk_hard_negatives(q, k, 6, pos=pos, q_group=q_group, k_group=k_group)
        loss = mgccl_ops.hard_negative_loss(q, k, pos, idx, 7.0, reduction="sum")
    loss.backward()
    q_low, k_low = leaves(q32.to(amp), k32.to(amp))
    idx_ref, sim_ref = mgccl_ops.topk_hard_negatives(q_low, k_low, 6, pos=pos, q_group=q_group, k_group=k_group)
    assert torch.equal(idx, idx_ref) and torch.equal(sim, sim_ref)
    assert sim.dtype == torch.float32
    expected = mgccl_ops.hard_negative_loss(q_low, k_low, pos, idx_ref, 7.0, reduction="sum")
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    torch.testing.assert_close(q.grad, q_low.grad.float(), rtol=0, atol=0)
    torch.testing.assert_close(k.grad, k_low.grad.float(), rtol=0, atol=0)
    ref = reference.hard_negative_loss(q_low, k_low, pos, idx_ref, 7.0, reduction="sum")
    assert_close(loss, ref, torch.float32, "loss against the reference on the cast inputs")


@pytest.mark.parametrize("amp", AUTOCAST_DTYPES)
@pytest.mark.parametrize("hard_negatives", [None, 4])
def test_multi_grained_loss_sees_the_cast_inputs_in_every_part(amp, hard_negatives):
    k32 = unit_rows(19, 12, 11)
    gen = torch.Generator().manual_seed(12)
    level_qs = [unit_rows(10, 12, 13), unit_rows(23, 12, 14)]
    pos = [torch.randint(-1, 19, (10,), generator=gen), torch.randint(-1, 19, (23,), generator=gen)]
    k_group = torch.randint(0, 4, (19,), generator=gen)
    q_groups = [torch.randint(0, 4, (n,), generator=gen) for n in (10, 23)]
    qs, (k,) = leaves(*level_qs), leaves(k32)
    levels = [(q, p, w, g) for q, p, w, g in zip(qs, pos, (1.0, 0.5), q_groups)]
    with torch.autocast("cpu", dtype=amp):
        total, per_level = mgccl_ops.multi_grained_loss(levels, k, 9.0, k_group=k_group, hard_negatives=hard_negatives)
    total.backward()
    low = leaves(*(q.to(amp) for q in level_qs), k32.to(amp))
    low_levels = [(q, p, w, g) for q, p, w, g in zip(low[:2], pos, (1.0, 0.5), q_groups)]
    expected_total, expected_per_level = mgccl_ops.multi_grained_loss(
        low_levels, low[2], 9.0, k_group=k_group, hard_negatives=hard_negatives
    )
    expected_total.backward()
    torch.testing.assert_close(total, expected_total, rtol=0, atol=0)
    torch.testing.assert_close(per_level, expected_per_level, rtol=0, atol=0)
    for got, want in zip((*qs, k), low):
        torch.testing.assert_close(got.grad, want.grad.float(), rtol=0, atol=0)
    ref_total, ref_per_level = reference.multi_grained_loss(
        low_levels, low[2], 9.0, k_group=k_group, hard_negatives=hard_negatives
    )
    assert_close(per_level, ref_per_level, torch.float32, "per_level against the reference on the cast inputs")


@pytest.mark.parametrize("amp", AUTOCAST_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_region_ops_keep_their_input_dtype(amp, dtype):
    gen = torch.Generator().manual_seed(15)
    feat = torch.randn(2, 6, 9, 11, generator=gen).to(dtype)
    x = torch.randn(2, 5, 9, 11, generator=gen).to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=amp):
        labels, num = mgccl_ops.region_merge(feat, 0.2)
        thresholds = mgccl_ops.region_auto_threshold(feat)
        pooled = mgccl_ops.region_pool(x, labels, num)
        back = mgccl_ops.region_broadcast(pooled, labels)
    assert pooled.dtype == back.dtype == dtype
    back.sum().backward()
    labels_ref, num_ref = mgccl_ops.region_merge(feat, 0.2)
    assert torch.equal(labels, labels_ref) and torch.equal(num, num_ref)
    assert torch.equal(thresholds, mgccl_ops.region_auto_threshold(feat))
    x_ref = x.detach().clone().requires_grad_()
    pooled_ref = mgccl_ops.region_pool(x_ref, labels_ref, num_ref)
    mgccl_ops.region_broadcast(pooled_ref, labels_ref).sum().backward()
    torch.testing.assert_close(pooled, pooled_ref, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)


@pytest.mark.parametrize("amp", AUTOCAST_DTYPES)
def test_adaptive_semantic_unit_runs_under_autocast(amp):
    gen = torch.Generator().manual_seed(16)
    pixel_feat = torch.randn(2, 8, 12, 10, generator=gen)
    text = torch.randn(5, 8, generator=gen)
    with torch.autocast("cpu", dtype=amp):
        logits = mgccl_ops.adaptive_semantic_unit(pixel_feat, text, threshold=0.3)
    assert logits.dtype == torch.float32 and logits.shape == (2, 5, 12, 10)
    expected = reference.adaptive_semantic_unit(pixel_feat, text, threshold=0.3)
    assert_close(logits, expected, amp, "logits")


def test_backward_ops_run_with_autocast_on_when_called_directly():
    q, k = unit_rows(8, 4, 17), unit_rows(8, 4, 18)
    pos, scale = torch.arange(8), torch.tensor(4.0)
    _, row_lse, col_lse, *_ = torch.ops.mgccl.contrastive_loss(q, k, pos, scale, None, "none", True, [False] * 3)
    row_grad = torch.ones(8)
    expected = torch.ops.mgccl.contrastive_loss_backward(row_grad, q, k, pos, scale, row_lse, col_lse, True, [True] * 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = torch.ops.mgccl.contrastive_loss_backward(
            row_grad, q, k, pos, scale, row_lse, col_lse, True, [True] * 3
        )
    for got, want in zip(inside, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_every_mgccl_op_has_an_autocast_kernel_for_cpu_and_cuda():
    for name in autocast.namespace_ops():
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mgccl::{name}", key), (name, key)


def test_every_cast_argument_is_an_argument_of_its_operator():
    for name in autocast.namespace_ops():
        arguments = [a.name for a in getattr(torch.ops.mgccl, name).default._schema.arguments]
        missing = [a for a in autocast.cast_argument_names(name) if a not in arguments]
        assert not missing, f"mgccl::{name} has no argument {missing}: update CAST_TO_AUTOCAST_DTYPE"


def test_autocast_rule_under_torch_compile_matches_eager():
    q, k = unit_rows(16, 8, 19), unit_rows(16, 8, 20)
    pos = torch.arange(16)

    def loss_fn(q, k):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return mgccl_ops.contrastive_loss(q, k, pos, 10.0, symmetric=True)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k), loss_fn(q, k), rtol=0, atol=0)


def test_train_with_amp_bf16_trains(tmp_path):
    argv = ["train", "--amp", "bf16", "--steps", "2", "--batch-size", "4", "--image-size", "32",
            "--hard-negatives", "4", "--out-dir", str(tmp_path), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2
    for key in ("loss", "object", "part", "pixel", "grad_norm"):
        assert torch.isfinite(torch.tensor(records[-1][key])), (key, records[-1])
    assert records[-1]["loss"] > 0
    assert (tmp_path / "checkpoint.pt").is_file()
