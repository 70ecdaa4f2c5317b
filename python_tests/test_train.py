"""Training: the objective, the schedule, atomic checkpoints, a falling loss, exact resume."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import mgccl_ops.reference as reference_ops
from mgccl_ops.backends import get_ops
from mgccl_ops.train import checkpoint
from mgccl_ops.train.config import TrainConfig
from mgccl_ops.train.objective import ObjectiveConfig, entity_bank_index, mgccl_loss, pixel_pseudo_labels
from mgccl_ops.train.refine import colour_affinity, propagate
from mgccl_ops.train.schedule import warmup_cosine
from mgccl_ops.train.trainer import autocast_dtype, train


def _tiny(tmp_path, **kw) -> TrainConfig:
    base = dict(out_dir=str(tmp_path), steps=6, batch_size=6, num_samples=64, image_size=32, dim=16, warmup=2,
                checkpoint_every=2, log_every=1, progress=False, backend="reference")  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_entity_bank_rows_follow_raster_order_of_filled_slots():
    ids = torch.tensor([[0, 1, -1], [1, -1, -1], [2, 0, 3]])
    assert entity_bank_index(ids).tolist() == [[0, 1, -1], [2, -1, -1], [3, 4, 5]]


def _features(seed=0, b=3, p=10, d=8, u=4):
    gen = torch.Generator().manual_seed(seed)
    dense = F.normalize(torch.randn(b, p, d, generator=gen), dim=-1)
    glob = F.normalize(torch.randn(b, d, generator=gen), dim=-1)
    cap = F.normalize(torch.randn(b, d, generator=gen), dim=-1)
    phrases = F.normalize(torch.randn(u, d, generator=gen), dim=-1)
    return dense, glob, cap, phrases


def test_object_only_ablation_is_the_symmetric_caption_loss():
    dense, glob, cap, phrases = _features()
    ids = torch.tensor([[0, 1], [1, -1], [2, 3]])
    scale = torch.tensor(math.log(10.0))
    cfg = ObjectiveConfig(part_weight=0, pixel_weight=0)
    total, parts = mgccl_loss(reference_ops, dense, glob, cap, phrases, ids, scale, cfg)
    logits = 10.0 * glob @ cap.T
    clip = (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.T, torch.arange(3))) / 2
    assert set(parts) == {"object"} and torch.allclose(total, clip, atol=1e-5)


def test_full_objective_sums_weighted_levels_and_reaches_every_input():
    dense, glob, cap, phrases = (t.requires_grad_() for t in _features(1))
    ids = torch.tensor([[0, 1], [1, -1], [2, 3]])
    scale = torch.tensor(math.log(10.0), requires_grad=True)
    cfg = ObjectiveConfig(part_weight=0.5, pixel_weight=2.0, pixel_bound=-1.0, hard_negatives=2)
    total, parts = mgccl_loss(reference_ops, dense, glob, cap, phrases, ids, scale, cfg)
    assert set(parts) == {"object", "part", "pixel"}
    expect = parts["object"].detach() + 0.5 * parts["part"] + 2.0 * parts["pixel"]
    assert torch.allclose(total.detach(), expect, atol=1e-5)
    total.backward()
    for t in (dense, glob, cap, phrases, scale):
        assert t.grad is not None and t.grad.abs().sum() > 0
    unbounded = parts["pixel"]
    _, parts = mgccl_loss(reference_ops, dense, glob, cap, phrases, ids, scale, cfg.__class__(pixel_bound=1.5))
    assert parts["pixel"] == 0 and unbounded > 0  # every pixel under the bound: none contribute


def test_schedule_warms_up_then_decays_to_the_floor():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(()))], lr=1.0)
    sched = warmup_cosine(opt, warmup=4, total=14, floor=0.1)
    rates = []
    for _ in range(15):
        rates.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert rates[9] == pytest.approx(0.1 + 0.9 * 0.5) and rates[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(rates[3:], rates[4:], strict=False))


def test_atomic_save_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save_atomic({"a": torch.arange(3)}, path)
    with pytest.raises(Exception):  # noqa: B017  (whatever pickling raises)
        checkpoint.save_atomic({"bad": lambda: 0}, path)
    assert torch.equal(checkpoint.load(path)["a"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        checkpoint.load(tmp_path / "missing.pt")


def test_backend_switch_and_amp_choice():
    assert get_ops("reference") is reference_ops
    with pytest.raises(ValueError, match="backend must be one of"):
        get_ops("numpy")
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ValueError, match="amp must be"):
        autocast_dtype("fp8", torch.device("cpu"))


def _records(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def test_loss_falls_on_a_short_run(tmp_path):
    cfg = _tiny(tmp_path, steps=30, batch_size=12, lr=3e-3, warmup=3, checkpoint_every=30)
    train(cfg)
    losses = [r["loss"] for r in _records(tmp_path)]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    last = _records(tmp_path)[-1]
    assert {"object", "part", "pixel", "lr", "images_per_s", "peak_memory_mib"} <= set(last)


def test_resume_equals_uninterrupted_training_bit_for_bit(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    model_a = train(_tiny(whole))
    train(_tiny(parts), stop_after=3)
    assert checkpoint.load(parts / "checkpoint.pt")["step"] == 3
    model_b = train(_tiny(parts), resume=True)
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    a_log, b_log = _records(whole), _records(parts)
    assert [r["step"] for r in b_log] == list(range(1, 7))
    assert [r["loss"] for r in a_log] == [r["loss"] for r in b_log]
    end_a, end_b = checkpoint.load(whole / "checkpoint.pt"), checkpoint.load(parts / "checkpoint.pt")
    assert end_a["optimizer"]["state"][0]["exp_avg"].equal(end_b["optimizer"]["state"][0]["exp_avg"])


def test_background_key_competes_with_the_entities_and_is_its_own_level():
    dense, glob, cap, phrases = _features(2, p=12)
    ids = torch.tensor([[0, 1], [1, -1], [2, 3]])
    background = torch.randn(8, requires_grad=True)
    scale = torch.tensor(math.log(10.0))
    cfg = ObjectiveConfig(pixel_bound=-1.0, hard_negatives=3, pixel_weight=1.0, background_weight=0.25)
    total, parts = mgccl_loss(reference_ops, dense, glob, cap, phrases, ids, scale, cfg, background)
    assert set(parts) == {"object", "part", "pixel", "background"}
    expect = parts["object"] + 0.5 * parts["part"] + parts["pixel"] + 0.25 * parts["background"]
    assert torch.allclose(total.detach(), expect, atol=1e-5)
    total.backward()
    assert background.grad is not None and background.grad.abs().sum() > 0


def _labels(dense, slots, background, images=None, grid=None, **cfg):
    valid = torch.ones(slots.shape[:2], dtype=torch.bool)
    bank_row = torch.arange(slots.shape[0] * slots.shape[1]).view(slots.shape[:2])
    scale = torch.tensor(10.0)
    config = ObjectiveConfig(**cfg)
    return pixel_pseudo_labels(dense, slots, valid, bank_row, background, scale, config, images, grid)


def test_pixel_labels_are_the_best_of_own_entities_and_the_background_key():
    eye = torch.eye(4)
    slots = eye[None, :2]  # one image, entities e0 and e1: bank rows 0, 1; background key row 2
    background = eye[2:3]
    dense = torch.stack([eye[0], eye[1], eye[2], F.normalize(eye[0] + 0.5 * eye[2], dim=0), eye[3]])[None]
    labels = _labels(dense, slots, background, refine_iters=0, pixel_bound=0.2)
    # the last pixel is most like e0 (all ties at 0 pick e0) but below the confidence bound: ignored
    assert labels.tolist() == [0, 1, 2, 0, -1]
    no_key = _labels(dense, slots, background[:0], refine_iters=0, pixel_bound=-1.0)
    assert no_key.tolist() == [0, 1, 0, 0, 0]


def test_colour_refinement_moves_a_halo_cell_to_the_background_it_looks_like():
    """A 4x4 grid whose left half is a red object (entity e0) and right half grey
    background; the grey cells next to the object have features slightly closer to e0
    (the halo a convolution leaves). Refinement gives them back to the background."""
    eye = torch.eye(3)
    slots, background = eye[None, :1], eye[1:2]
    grid = (4, 4)
    near_object = F.normalize(eye[0] + 0.9 * eye[1], dim=0)
    cells = [eye[0] if x < 2 else (near_object if x == 2 else eye[1]) for y in range(4) for x in range(4)]
    dense = torch.stack(cells)[None]
    images = torch.full((1, 3, 16, 16), 128.0)
    images[:, :, :, :8] = torch.tensor([220.0, 30.0, 30.0])[:, None, None]
    raw = _labels(dense, slots, background, refine_iters=0).view(grid)
    refined = _labels(dense, slots, background, images, grid, refine_iters=10).view(grid)
    assert raw[:, 2].tolist() == [0, 0, 0, 0]  # the halo column takes the object without refinement
    assert refined[:, :2].eq(0).all() and refined[:, 2:].eq(1).all(), refined


def test_propagation_keeps_probabilities_and_averages_where_colours_are_alike():
    grid = (3, 5)
    prob = torch.softmax(torch.randn(2, 15, 4), -1)
    flat = torch.zeros(2, 3, 12, 20)
    out = propagate(prob, colour_affinity(flat, grid, tau=0.05), grid, iters=1)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 15))
    box = F.avg_pool2d(F.pad(prob.transpose(1, 2).reshape(2, 4, *grid), (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    torch.testing.assert_close(out, box.flatten(2).transpose(1, 2))


def test_fused_and_reference_backends_give_the_same_objective():
    fused = get_ops("fused")
    grads = {}
    for name, ops in (("fused", fused), ("reference", reference_ops)):
        dense, glob, cap, phrases = (t.requires_grad_() for t in _features(3, b=4, p=20))
        ids = torch.tensor([[0, 1, -1], [1, 2, -1], [3, 2, 0], [2, -1, -1]])
        background = torch.randn(8, generator=torch.Generator().manual_seed(5)).requires_grad_()
        scale = torch.tensor(math.log(10.0), requires_grad=True)
        total, parts = mgccl_loss(ops, dense, glob, cap, phrases, ids, scale, ObjectiveConfig(hard_negatives=3),
                                  background)  # fmt: skip
        total.backward()
        grads[name] = (total.detach(), parts, [t.grad for t in (dense, glob, cap, phrases, background, scale)])
    (f_total, f_parts, f_grads), (r_total, r_parts, r_grads) = grads["fused"], grads["reference"]
    assert torch.allclose(f_total, r_total, atol=1e-5)
    assert all(torch.allclose(f_parts[k], r_parts[k], atol=1e-5) for k in r_parts)
    for f, r in zip(f_grads, r_grads, strict=True):
        assert torch.allclose(f, r, atol=1e-5, rtol=1e-4)
