"""Evaluation: mIoU against torchmetrics, units, background threshold, an oracle model, the PNG."""

import benchmark_fixtures
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex

import mgccl_ops.reference as reference_ops
from mgccl_ops.backends import get_ops
from mgccl_ops.data.segmentation import SegmentationFolder
from mgccl_ops.evaluate.evaluator import EvalSettings, evaluate
from mgccl_ops.evaluate.inference import image_logits, resized_size, slide_windows
from mgccl_ops.evaluate.metrics import ConfusionMatrix
from mgccl_ops.evaluate.prompts import class_embeddings
from mgccl_ops.evaluate.units import UNITS, group_logits, kmeans_labels, pixel_logits, predict
from mgccl_ops.evaluate.visualize import palette, save_grid
from mgccl_ops.models import SmallDualEncoder


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mean_iou_matches_torchmetrics_over_a_split(seed):
    gen = torch.Generator().manual_seed(seed)
    classes = 6
    ours = ConfusionMatrix(classes)
    theirs = MulticlassJaccardIndex(classes, average="macro", ignore_index=255)
    for _ in range(4):
        target = torch.randint(0, classes - 1, (3, 17, 13), generator=gen)  # the last class never occurs
        target[torch.rand(target.shape, generator=gen) < 0.1] = 255
        pred = torch.where(torch.rand(target.shape, generator=gen) < 0.6, target.clamp(max=classes - 1), 0)
        pred[:, :2] = torch.randint(0, classes - 2, (3, 2, 13), generator=gen)  # class 4 never predicted
        ours.update(pred, target)
        theirs.update(pred, target)
    assert ours.mean_iou() == pytest.approx(float(theirs.compute()), abs=1e-6)


def test_iou_is_nan_only_for_classes_absent_from_target_and_prediction():
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 1, 1, 3]), torch.tensor([0, 1, 2, 255]))
    iou = cm.iou()
    assert iou[0] == 1 and iou[1] == 0.5 and iou[2] == 0 and iou[3].isnan()
    assert cm.mean_iou() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long))


def test_kmeans_separates_clear_clusters_deterministically():
    a, b = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0])
    noise = 0.01 * torch.randn(1, 12, 3, generator=torch.Generator().manual_seed(0))
    feats = torch.stack([a] * 5 + [b] * 7)[None] + noise
    labels = kmeans_labels(feats, groups=2)
    assert labels.shape == (1, 12)
    assert len(set(labels[0, :5].tolist())) == 1 and len(set(labels[0, 5:].tolist())) == 1
    assert labels[0, 0] != labels[0, 5]
    assert torch.equal(labels, kmeans_labels(feats, groups=2))


def test_group_logits_are_constant_within_each_group():
    dense = F.normalize(torch.randn(2, 24, 5, generator=torch.Generator().manual_seed(1)), dim=-1)
    text = F.normalize(torch.randn(3, 5), dim=-1)
    out = group_logits(reference_ops, dense, (4, 6), text, groups=3)
    assert out.shape == (2, 3, 4, 6)
    labels = kmeans_labels(dense, 3).reshape(2, 4, 6)
    for b in range(2):
        for g in labels[b].unique():
            values = out[b][:, labels[b] == g]
            assert torch.allclose(values, values[:, :1].expand_as(values))
    assert torch.allclose(out.mean((2, 3)), pixel_logits(dense, (4, 6), text).mean((2, 3)), atol=1e-5)


def test_predict_applies_the_background_threshold():
    logits = torch.tensor([[[[0.9, 0.1]], [[0.2, 0.3]]]])  # [1, T=2, 1, 2]
    assert predict(logits, (1, 2), 0.5).tolist() == [[[1, 0]]]
    assert predict(logits, (1, 2), None).tolist() == [[[0, 1]]]


def test_predict_calls_background_where_the_background_key_wins():
    # [1, T=2 classes + key, 1, 3]: the key beats both classes at the middle pixel only
    logits = torch.tensor([[[[0.9, 0.6, 0.2]], [[0.1, 0.7, 0.1]], [[0.0, 0.8, 0.0]]]])
    assert predict(logits, (1, 3), 0.5, background_key=True).tolist() == [[[1, 0, 0]]]
    assert predict(logits, (1, 3), -1.0, background_key=True).tolist() == [[[1, 0, 1]]]


class OracleModel(torch.nn.Module):
    """Dense features are the one-hot class written in the image's red channel (0 = background,
    mapped to a direction no class name has); texts embed as the one-hot of the class they name."""

    def __init__(self, names):
        super().__init__()
        self.names = names
        self.logit_scale = torch.nn.Parameter(torch.zeros(()))

    def encode_image(self, images):
        cls = images[:, 0].long()  # stride 1: upsampling is the identity
        dense = F.one_hot(cls, len(self.names) + 1).float().flatten(1, 2)
        dense = torch.roll(dense, -1, dims=-1)  # class k -> dim k-1; background -> the last dim
        return dense, dense.mean(1), tuple(cls.shape[1:])

    def encode_text(self, texts):
        ids = [next(i for i, n in enumerate(self.names) if n in t) for t in texts]
        return F.one_hot(torch.tensor(ids), len(self.names) + 1).float()


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_evaluate_scores_an_oracle_perfectly_and_draws_the_grid(tmp_path, backend):
    names = ["background", "red star", "blue ring"]
    samples = []
    for i in range(3):
        mask = torch.zeros(16, 16, dtype=torch.long)
        mask[4 : 8 + 4 * i, 4:12] = 1 + i % 2
        mask[12:, :4] = 2
        samples.append({"image": mask.to(torch.uint8)[None].repeat(3, 1, 1), "mask": mask.clone()})
    samples[2]["mask"][0, 0] = 255  # ignored pixel
    model = OracleModel(names[1:])
    settings = EvalSettings(background_threshold=0.5, groups=3, batch_size=2, keep=2)
    result = evaluate(model, samples, names, True, get_ops(backend), settings)
    assert result.mean_iou() == {"pixel": 100.0, "group": 100.0, "adaptive": 100.0}
    per_unit = EvalSettings(background_threshold={"pixel": 0.5, "group": 0.5, "adaptive": 2.0}, groups=3)
    scores = evaluate(model, samples, names, True, get_ops(backend), per_unit).mean_iou()
    assert scores["pixel"] == scores["group"] == 100.0 and scores["adaptive"] < 50  # all called background
    assert len(result.images) == 2 and len(result.predictions["adaptive"]) == 2
    path = tmp_path / "grid.png"
    save_grid(path, result.images, result.targets, result.predictions, len(names), scale=2)
    with Image.open(path) as png:
        assert png.size == (5 * (32 + 2), 14 + 2 * (32 + 2))
        pixel = png.getpixel((2 * 34 + 8 * 2, 14 + 6 * 2))  # row 0, pixel-unit column, inside the star
    assert pixel == tuple(palette(3)[1])


def test_class_embeddings_average_templates():
    model = OracleModel(["red star", "blue ring"])
    emb = class_embeddings(model, ["blue ring", "red star"], templates=("a {}.", "the {} here"))
    assert torch.allclose(emb, torch.tensor([[0.0, 1, 0], [1, 0, 0]]))


def test_slide_windows_follow_mmseg_and_cover_the_image():
    boxes = slide_windows(10, 17, window=6, stride=4)
    # rows: ceil((10 - 6) / 4) + 1 = 2 (the last flush with the bottom); cols: ceil((17 - 6) / 4) + 1 = 4
    assert sorted({(y0, y1) for y0, y1, _, _ in boxes}) == [(0, 6), (4, 10)]
    assert sorted({(x0, x1) for _, _, x0, x1 in boxes}) == [(0, 6), (4, 10), (8, 14), (11, 17)]
    covered = torch.zeros(10, 17)
    for y0, y1, x0, x1 in boxes:
        covered[y0:y1, x0:x1] += 1
    assert bool((covered > 0).all())
    assert slide_windows(5, 4, window=8, stride=4) == [(0, 5, 0, 4)]  # one window cut to a small image
    with pytest.raises(ValueError, match="stride <= window"):
        slide_windows(10, 10, window=4, stride=5)
    assert resized_size(375, 500, 448, 2048) == (448, 597)
    assert resized_size(100, 1000, 448, 2048) == (205, 2048)  # the long-side cap wins
    assert resized_size(30, 40, None, None) == (30, 40)


def test_sliding_windows_average_where_they_overlap():
    image = torch.zeros(3, 10, 17, dtype=torch.uint8)
    boxes = slide_windows(10, 17, 6, 4)
    order = iter(range(len(boxes)))

    class Constant(torch.nn.Module):  # dense features: a constant per window, the window's number
        logit_scale = torch.nn.Parameter(torch.zeros(()))

        def encode_image(self, images):
            n, _, h, w = images.shape
            values = torch.tensor([float(next(order)) for _ in range(n)])
            return values.view(n, 1, 1).expand(n, h * w, 1), None, (h, w)

    out = image_logits(Constant(), image, ["pixel"], lambda unit, dense, grid, images: dense.reshape(-1, 1, *grid),
                       short_side=None, max_long_side=None, window=6, stride=4, batch_size=3)["pixel"]  # fmt: skip
    total, count = torch.zeros(10, 17), torch.zeros(10, 17)
    for k, (y0, y1, x0, x1) in enumerate(boxes):
        total[y0:y1, x0:x1] += k
        count[y0:y1, x0:x1] += 1
    assert out.shape == (1, 1, 10, 17) and torch.allclose(out[0, 0], total / count)


def _small_model(seed: int = 0) -> SmallDualEncoder:
    torch.manual_seed(seed)
    return SmallDualEncoder(["cat", "dog", "sky", "tree"], dim=16).eval()


@pytest.mark.parametrize("size", [(24, 32), (20, 20)])
def test_sliding_window_equals_whole_image_where_the_window_covers_it(size):
    model = _small_model()
    names = ["cat", "dog", "sky", "tree"]
    gen = torch.Generator().manual_seed(1)
    samples = [{"image": torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=gen),
                "mask": torch.randint(0, 4, size, generator=gen)} for _ in range(2)]  # fmt: skip
    ops = get_ops("reference")
    whole = EvalSettings(groups=3, keep=2, templates=("{}",))
    slide = EvalSettings(groups=3, keep=2, templates=("{}",), window=32, stride=16)
    a, b = evaluate(model, samples, names, False, ops, whole), evaluate(model, samples, names, False, ops, slide)
    for unit in UNITS:
        assert torch.equal(a.matrices[unit].matrix, b.matrices[unit].matrix), unit
        assert all(torch.equal(p, q) for p, q in zip(a.predictions[unit], b.predictions[unit], strict=True))


def test_an_image_larger_than_the_window_is_scored_window_by_window():
    names = ["background", "red star", "blue ring"]
    mask = torch.zeros(23, 37, dtype=torch.long)
    mask[3:15, 5:20], mask[12:22, 24:35], mask[0, 0] = 1, 2, 255
    image = mask.clamp(max=2).to(torch.uint8)[None].repeat(3, 1, 1)
    settings = EvalSettings(background_threshold=0.5, units=("pixel",), window=8, stride=5, keep=1)
    result = evaluate(OracleModel(names[1:]), [{"image": image, "mask": mask}], names, True, reference_ops, settings)
    assert len(slide_windows(23, 37, 8, 5)) == 4 * 7 and result.mean_iou() == {"pixel": 100.0}
    assert result.predictions["pixel"][0].shape == (23, 37)


def test_scores_at_the_original_mask_resolution_match_torchmetrics(tmp_path):
    benchmark_fixtures.build(tmp_path, "voc", shapes=((21, 30), (34, 17), (16, 16)))
    data = SegmentationFolder(tmp_path, "voc")
    model = _small_model(3)
    settings = EvalSettings(background_threshold=0.0, groups=3, keep=3, templates=("{}",), short_side=24,
                            max_long_side=40, window=16, stride=8, batch_size=4)  # fmt: skip
    result = evaluate(model, data, data.class_names, True, get_ops("reference"), settings)
    for unit in UNITS:
        metric = MulticlassJaccardIndex(len(data.class_names), average="macro", ignore_index=255)
        for pred, item in zip(result.predictions[unit], data, strict=True):
            assert pred.shape == item["mask"].shape  # scored at the mask's own size, not the resized one
            metric.update(pred, item["mask"])
        assert result.mean_iou()[unit] == pytest.approx(100 * float(metric.compute()), abs=1e-4), unit
