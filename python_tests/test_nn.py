"""mgccl_ops.nn: the open_clip drop-ins against open_clip, MultiGrainedLoss against the op, and
HardNegativeMiner against pytorch-metric-learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from compare import assert_close
from hypothesis import given
from hypothesis import strategies as st

import mgccl_ops
from mgccl_ops import nn as mnn
from mgccl_ops import reference
from mgccl_ops.nn.miner import positive_pairs


def open_clip_loss():
    """open_clip's loss module (an optional dependency: the tests that need it skip without it)."""
    return pytest.importorskip("open_clip.loss")


def features(n, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype).requires_grad_()
    text = F.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype).requires_grad_()
    return image, text


def run(loss_fn, *inputs, **kwargs):
    """The loss (or its dict) and the gradients of every tensor input that requires grad."""
    for t in inputs:
        if isinstance(t, torch.Tensor):
            t.grad = None
    out = loss_fn(*inputs, **kwargs)
    loss = out["contrastive_loss"] if isinstance(out, dict) else out
    loss.backward()
    return out, [t.grad.clone() for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 64])
@pytest.mark.parametrize("output_dict", [False, True])
def test_clip_loss_equals_open_clip(dtype, n, output_dict):
    image, text = features(n, 16, dtype)
    logit_scale = torch.tensor(2.659, dtype=dtype, requires_grad=True)
    ours, our_grads = run(
        lambda i, t, s: mnn.ClipLoss()(i, t, s.exp(), output_dict=output_dict), image, text, logit_scale
    )
    theirs, their_grads = run(
        lambda i, t, s: open_clip_loss().ClipLoss()(i, t, s.exp(), output_dict=output_dict), image, text, logit_scale
    )
    if output_dict:
        assert set(ours) == set(theirs) == {"contrastive_loss"}
        ours, theirs = ours["contrastive_loss"], theirs["contrastive_loss"]
    else:
        assert isinstance(ours, torch.Tensor) and ours.dim() == 0
    assert_close(ours, theirs, dtype, "loss")
    for name, a, b in zip(("image", "text", "logit_scale"), our_grads, their_grads):
        assert_close(a, b, dtype, f"grad {name}")


def test_clip_loss_with_logit_bias_and_one_element_scale():
    image, text = features(12, 8, torch.float64)
    scale = torch.tensor([14.0], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    ours, our_grads = run(lambda i, t, s, b: mnn.ClipLoss()(i, t, s, b), image, text, scale, bias)
    theirs, their_grads = run(lambda i, t, s, b: open_clip_loss().ClipLoss()(i, t, s, b), image, text, scale, bias)
    assert_close(ours, theirs, torch.float64, "loss")
    for a, b in zip(our_grads, their_grads):
        assert_close(a, b, torch.float64)
    assert our_grads[3].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 9, 80])
@pytest.mark.parametrize("output_dict", [False, True])
def test_siglip_loss_equals_open_clip(dtype, n, output_dict):
    image, text = features(n, 12, dtype, seed=n)
    logit_scale = torch.tensor(2.3026, dtype=dtype, requires_grad=True)
    logit_bias = torch.tensor(-10.0, dtype=dtype, requires_grad=True)

    def call(module):
        return lambda i, t, s, b: module(i, t, s.exp(), b, output_dict=output_dict)

    ours, our_grads = run(call(mnn.SigLipLoss()), image, text, logit_scale, logit_bias)
    theirs, their_grads = run(call(open_clip_loss().SigLipLoss()), image, text, logit_scale, logit_bias)
    if output_dict:
        assert set(ours) == {"contrastive_loss"}
        ours, theirs = ours["contrastive_loss"], theirs["contrastive_loss"]
    assert_close(ours, theirs, dtype, "loss")
    for name, a, b in zip(("image", "text", "logit_scale", "logit_bias"), our_grads, their_grads):
        assert_close(a, b, dtype, f"grad {name}")


def test_module_constructor_errors():
    with pytest.raises(ValueError, match="use_horovod=True is not supported"):
        mnn.ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match=r"rank should lie in \[0, world_size = 2\), got 2"):
        mnn.ClipLoss(rank=2, world_size=2)
    with pytest.raises(ValueError, match="dist_impl should be one of"):
        mnn.SigLipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match=r"same shape \[N, D\], got \(4, 3\) and \(5, 3\)"):
        mnn.SigLipLoss()(torch.randn(4, 3), torch.randn(5, 3), 10.0, -10.0)
    with pytest.raises(ValueError, match=r"logit_scale should be a scalar .* got shape \(2,\)"):
        mnn.ClipLoss()(torch.randn(4, 3), torch.randn(4, 3), torch.ones(2))


def test_multi_grained_loss_module_equals_op():
    g = torch.Generator().manual_seed(1)
    k = torch.randn(30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    part = torch.randn(12, 8, generator=g, dtype=torch.float64, requires_grad=True)
    pixel = torch.randn(40, 8, generator=g, dtype=torch.float64, requires_grad=True)
    part_pos, pixel_pos = torch.randint(-1, 30, (12,), generator=g), torch.randint(-1, 30, (40,), generator=g)
    k_group = torch.randint(0, 6, (30,), generator=g)
    pixel_group = torch.randint(0, 6, (40,), generator=g)
    module = mnn.MultiGrainedLoss({"part": 1.0, "pixel": 0.5}, hard_negatives=5)
    out = module([(part, part_pos), (pixel, pixel_pos, pixel_group)], k, 7.0, k_group=k_group, output_dict=True)
    total, per_level = mgccl_ops.multi_grained_loss(
        [(part, part_pos, 1.0), (pixel, pixel_pos, 0.5, pixel_group)], k, 7.0, k_group=k_group, hard_negatives=5
    )
    ref_total, _ = reference.multi_grained_loss(
        [(part, part_pos, 1.0), (pixel, pixel_pos, 0.5, pixel_group)], k, 7.0, k_group=k_group, hard_negatives=5
    )
    assert set(out) == {"multi_grained_loss", "part", "pixel"}
    assert_close(out["multi_grained_loss"], total, torch.float64)
    assert_close(out["multi_grained_loss"], ref_total, torch.float64)
    assert_close(torch.stack([out["part"], out["pixel"]]), per_level, torch.float64)
    grads = torch.autograd.grad(out["multi_grained_loss"], (part, pixel, k))
    ref_grads = torch.autograd.grad(ref_total, (part, pixel, k))
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, torch.float64)
    assert "hard_negatives=5" in repr(module)
    with pytest.raises(ValueError, match=r"configured with 2 levels \['part', 'pixel'\], got 1"):
        module([(part, part_pos)], k, 7.0)


# --- HardNegativeMiner -------------------------------------------------------------------


def brute_positive_pairs(labels, ref_labels, same_set):
    pairs = [
        (i, j)
        for i in range(labels.shape[0])
        for j in range(ref_labels.shape[0])
        if labels[i] == ref_labels[j] and not (same_set and i == j)
    ]
    return pairs


@given(
    n=st.integers(0, 25), m=st.integers(0, 25), classes=st.integers(1, 6), same=st.booleans(), seed=st.integers(0, 999)
)
def test_positive_pairs_match_brute_force(n, m, classes, same, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    ref_labels = labels if same else torch.randint(0, classes, (m,), generator=g)
    anchors, positives = positive_pairs(labels, ref_labels, same)
    assert list(zip(anchors.tolist(), positives.tolist())) == brute_positive_pairs(labels, ref_labels, same)


def embeddings_and_labels(n=48, d=16, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("num_negatives", [1, 3])
def test_triplets_are_valid_and_the_hardest(num_negatives):
    x, labels = embeddings_and_labels()
    a, p, n = mnn.HardNegativeMiner(num_negatives=num_negatives)(x, labels)
    assert a.dtype == p.dtype == n.dtype == torch.int64 and a.shape == p.shape == n.shape
    assert (labels[a] == labels[p]).all() and (a != p).all() and (labels[a] != labels[n]).all()
    sim = F.normalize(x, dim=1) @ F.normalize(x, dim=1).T
    for i in range(x.shape[0]):
        different = labels != labels[i]
        hardest = torch.sort(torch.where(different, sim[i], -torch.inf), descending=True, stable=True).indices
        expected = set(hardest[: min(num_negatives, int(different.sum()))].tolist())
        got = n[a == i]
        positives = int((labels == labels[i]).sum()) - 1
        assert got.numel() == positives * len(expected)
        assert set(got.tolist()) == (expected if positives else set())


def test_hardest_positive_single_negative_equals_pml_batch_hard_miner():
    miners = pytest.importorskip("pytorch_metric_learning.miners")
    distances = pytest.importorskip("pytorch_metric_learning.distances")
    x, labels = embeddings_and_labels(n=64, classes=6, seed=3)
    ours = mnn.HardNegativeMiner(num_negatives=1, positives="hardest")(x, labels)
    theirs = miners.BatchHardMiner(distance=distances.CosineSimilarity())(x, labels)
    assert ours[0].numel() > 0
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b.long())


def test_miner_drives_pml_losses():
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    miners = pytest.importorskip("pytorch_metric_learning.miners")
    distances = pytest.importorskip("pytorch_metric_learning.distances")
    x, labels = embeddings_and_labels(n=40, classes=4, seed=5)
    x.requires_grad_()
    triplet_loss = losses.TripletMarginLoss(margin=0.2, distance=distances.CosineSimilarity())
    ours = triplet_loss(x, labels, mnn.HardNegativeMiner(num_negatives=1, positives="hardest")(x, labels))
    theirs = triplet_loss(x, labels, miners.BatchHardMiner(distance=distances.CosineSimilarity())(x, labels))
    assert ours.item() > 0
    assert_close(ours, theirs, torch.float32)
    ours.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # Pairs drive a pair loss: ContrastiveLoss sees exactly the mined negative pairs.
    a1, p, a2, n = mnn.HardNegativeMiner(num_negatives=2, output="pairs")(x, labels)
    assert (labels[a1] == labels[p]).all() and (labels[a2] != labels[n]).all()
    pair_loss = losses.ContrastiveLoss(pos_margin=1.0, neg_margin=0.0, distance=distances.CosineSimilarity())
    value = pair_loss(x, labels, (a1, p, a2, n))
    sim = F.normalize(x, dim=1) @ F.normalize(x, dim=1).T
    pos_terms = F.relu(1.0 - sim[a1, p])
    neg_terms = F.relu(sim[a2, n] - 0.0)
    expected = pos_terms[pos_terms > 0].mean() + neg_terms[neg_terms > 0].mean()
    assert_close(value, expected, torch.float32)


def test_miner_with_reference_set():
    x, labels = embeddings_and_labels(n=20, seed=7)
    ref, ref_labels = embeddings_and_labels(n=30, seed=8)
    a, p, n = mnn.HardNegativeMiner(num_negatives=2)(x, labels, ref, ref_labels)
    assert (labels[a] == ref_labels[p]).all() and (labels[a] != ref_labels[n]).all()
    expected_pairs = brute_positive_pairs(labels, ref_labels, False)
    assert set(zip(a.tolist(), p.tolist())) == {
        pair for pair in expected_pairs if (ref_labels != labels[pair[0]]).any()
    }


def test_miner_skip_and_max_sim():
    x, labels = embeddings_and_labels(n=30, seed=9)
    q = F.normalize(x, dim=1)
    plain = mnn.HardNegativeMiner(num_negatives=3)(x, labels)
    skipped = mnn.HardNegativeMiner(num_negatives=2, skip=1)(x, labels)
    for i in range(30):
        want = mgccl_ops.topk_hard_negatives(q, q, 3, q_group=labels, k_group=labels)[0][i, 1:3]
        got = skipped[2][skipped[0] == i]
        if got.numel():
            assert set(got.tolist()) == set(want[want >= 0].tolist())
    capped = mnn.HardNegativeMiner(num_negatives=3, max_sim=0.1)(x, labels)
    assert ((q[capped[0]] * q[capped[2]]).sum(1) <= 0.1 + 1e-6).all()
    assert capped[0].numel() <= plain[0].numel()


def test_miner_edge_cases_and_errors():
    x = torch.randn(5, 4)
    one_class = torch.zeros(5, dtype=torch.long)
    assert all(t.numel() == 0 for t in mnn.HardNegativeMiner()(x, one_class))
    singletons = torch.arange(5)
    assert all(t.numel() == 0 for t in mnn.HardNegativeMiner()(x, singletons))
    assert all(t.numel() == 0 for t in mnn.HardNegativeMiner(output="pairs")(x[:0], singletons[:0]))
    assert len(mnn.HardNegativeMiner()(x, torch.tensor([0, 0, 1, 1, 2], dtype=torch.int32))[0]) > 0
    with pytest.raises(ValueError, match="num_negatives should be an int >= 1, got 0"):
        mnn.HardNegativeMiner(num_negatives=0)
    with pytest.raises(ValueError, match="output should be one of"):
        mnn.HardNegativeMiner(output="quads")
    with pytest.raises(ValueError, match=r"labels should be \[5\], got shape \(4,\)"):
        mnn.HardNegativeMiner()(x, one_class[:4])
    with pytest.raises(ValueError, match="ref_emb and ref_labels should be given together"):
        mnn.HardNegativeMiner()(x, one_class, ref_emb=x)
    with pytest.raises(ValueError, match="integer class labels, got torch.float32"):
        mnn.HardNegativeMiner()(x, one_class.float())
