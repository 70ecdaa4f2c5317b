"""region_merge and region_auto_threshold (DESIGN.md op 5) against scipy and the plain-PyTorch reference."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import scipy.sparse
import scipy.sparse.csgraph
import torch
from hypothesis import given
from hypothesis import strategies as st

import mgccl_ops
from mgccl_ops import reference

LINKAGES = ["single", "average"]
CONNECTIVITIES = [4, 8]
ODD_SHAPES = [(1, 3, 1, 1), (1, 4, 1, 17), (1, 4, 17, 1), (2, 5, 9, 13), (3, 16, 24, 20)]
NEIGHBOURS = {4: ((0, 1), (1, 0)), 8: ((0, 1), (1, 0), (1, 1), (1, -1))}


def numpy_grid_graph(feat: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image [C, H, W] -> (src, dst, cosine similarity) of every neighbouring pixel pair, in numpy."""
    _, height, width = feat.shape
    norm = np.linalg.norm(feat, axis=0)
    unit = np.divide(feat, norm, out=np.zeros_like(feat), where=norm > 0)
    index = np.arange(height * width).reshape(height, width)
    src, dst, sim = [], [], []
    for dy, dx in NEIGHBOURS[connectivity]:
        ys = slice(0, height - dy)
        xs = slice(max(0, -dx), width - max(0, dx))
        ys2 = slice(dy, height)
        xs2 = slice(max(0, dx), width + min(0, dx))
        src.append(index[ys, xs].ravel())
        dst.append(index[ys2, xs2].ravel())
        sim.append(np.clip((unit[:, ys, xs] * unit[:, ys2, xs2]).sum(0).ravel(), -1, 1))
    return np.concatenate(src), np.concatenate(dst), np.concatenate(sim)


def canonical(components: np.ndarray) -> np.ndarray:
    """Any labeling [N] -> labels 0..k-1 numbered in order of each label's first occurrence."""
    _, first, inverse = np.unique(components, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first)] = np.arange(first.size)
    return rank[inverse]


def threshold_between_edges(sim: np.ndarray, quantile: float) -> float:
    """A threshold halfway between two consecutive edge similarities, so that rounding cannot
    decide which side of it an edge falls on."""
    values = np.unique(sim)
    k = min(int(quantile * values.size), values.size - 2)
    return float((values[k] + values[k + 1]) / 2)


def assert_canonical(labels: torch.Tensor, num: torch.Tensor) -> None:
    """labels [B, H, W] use exactly 0..num[b]-1, numbered in raster order of first pixels."""
    for b in range(labels.shape[0]):
        flat = labels[b].reshape(-1).numpy()
        assert np.array_equal(np.unique(flat), np.arange(int(num[b]))), f"image {b}: labels are not 0..num-1"
        assert np.array_equal(canonical(flat), flat), f"image {b}: labels are not in raster order of first pixels"


def random_feat(shape, dtype=torch.float64, seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("shape", ODD_SHAPES + [(8, 64, 32, 32)])
@pytest.mark.parametrize("connectivity", CONNECTIVITIES)
@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.8])
def test_single_linkage_equals_scipy_connected_components(shape, connectivity, quantile):
    feat = random_feat(shape)
    thresholds = []
    for image in feat.numpy():
        sim = numpy_grid_graph(image, connectivity)[2]
        thresholds.append(threshold_between_edges(sim, quantile) if sim.size > 1 else 0.0)
    labels, num = mgccl_ops.region_merge(
        feat, torch.tensor(thresholds, dtype=torch.float64), connectivity=connectivity, linkage="single"
    )
    n = shape[2] * shape[3]
    for b, image in enumerate(feat.numpy()):
        src, dst, sim = numpy_grid_graph(image, connectivity)
        keep = sim >= thresholds[b]
        graph = scipy.sparse.coo_matrix((np.ones(keep.sum()), (src[keep], dst[keep])), shape=(n, n))
        count, components = scipy.sparse.csgraph.connected_components(graph, directed=False)
        ours = labels[b].reshape(-1).numpy()
        assert num[b] == count
        # The same partition up to relabelling: the pairs (ours, scipy's) are a bijection ...
        assert np.unique(np.stack([ours, components]), axis=1).shape[1] == count
        # ... and exactly equal once scipy's components are numbered canonically.
        assert np.array_equal(ours, canonical(components))


@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("connectivity", CONNECTIVITIES)
@pytest.mark.parametrize("threshold", [-1.0, 0.0, 0.3, 1.5, "auto"])
def test_average_linkage_equals_reference(shape, connectivity, threshold):
    feat = random_feat(shape, seed=1)
    labels, num = mgccl_ops.region_merge(feat, threshold, connectivity=connectivity, linkage="average")
    ref_labels, ref_num = reference.region_merge(feat, threshold, connectivity=connectivity, linkage="average")
    assert torch.equal(num, ref_num)
    assert torch.equal(labels, ref_labels)


@pytest.mark.parametrize("linkage", LINKAGES)
def test_per_image_threshold_tensor(linkage):
    feat = random_feat((3, 6, 10, 9), seed=2)
    threshold = torch.tensor([-1.0, 0.2, 2.0])
    labels, num = mgccl_ops.region_merge(feat, threshold, linkage=linkage)
    for b in range(3):
        one_labels, one_num = mgccl_ops.region_merge(feat[b : b + 1], float(threshold[b]), linkage=linkage)
        assert torch.equal(labels[b], one_labels[0]) and num[b] == one_num[0]
    assert num[0] == 1 and num[2] == 90
    zero_dim = mgccl_ops.region_merge(feat, torch.tensor(0.2), linkage=linkage)
    assert torch.equal(zero_dim[0], mgccl_ops.region_merge(feat, 0.2, linkage=linkage)[0])


@pytest.mark.parametrize("connectivity", CONNECTIVITIES)
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_auto_threshold_equals_reference(connectivity, dtype, atol):
    feat = random_feat((3, 8, 15, 11), dtype=dtype, seed=3) + 0.5
    ours = mgccl_ops.region_auto_threshold(feat, connectivity=connectivity)
    ref = reference.region_auto_threshold(feat, connectivity=connectivity)
    assert ours.dtype == torch.float64 and ours.shape == (3,)
    torch.testing.assert_close(ours, ref, atol=atol, rtol=0)
    for linkage in LINKAGES:
        auto = mgccl_ops.region_merge(feat, "auto", connectivity=connectivity, linkage=linkage)
        explicit = mgccl_ops.region_merge(feat, ours, connectivity=connectivity, linkage=linkage)
        assert torch.equal(auto[0], explicit[0]) and torch.equal(auto[1], explicit[1])


def test_auto_threshold_without_edges_is_inf():
    assert mgccl_ops.region_auto_threshold(torch.randn(2, 3, 1, 1)).tolist() == [float("inf")] * 2


def block_image(dtype: torch.dtype, noise: float, seed: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A 24 x 30 image of 3 x 3 rectangular blocks with random unit features plus noise of norm
    about ``noise``: (feat [1, 16, 24, 30], truth [1, 24, 30])."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.tensor([0] * 7 + [1] * 9 + [2] * 8)
    cols = torch.tensor([0] * 12 + [1] * 5 + [2] * 13)
    truth = rows[:, None] * 3 + cols[None, :]
    cells = torch.nn.functional.normalize(torch.randn(9, 16, generator=generator), dim=1)
    feat = cells[truth].permute(2, 0, 1) + noise / 4 * torch.randn(16, 24, 30, generator=generator)
    return feat[None].to(dtype), truth[None]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("linkage", LINKAGES)
@pytest.mark.parametrize("connectivity", CONNECTIVITIES)
def test_block_image_recovered_in_every_dtype(dtype, linkage, connectivity):
    feat, truth = block_image(dtype, noise=0.3)
    labels, num = mgccl_ops.region_merge(feat, 0.6, connectivity=connectivity, linkage=linkage)
    assert num.tolist() == [9]
    assert torch.equal(labels, truth)


@pytest.mark.parametrize("linkage", LINKAGES)
def test_auto_threshold_recovers_low_noise_blocks(linkage):
    feat, truth = block_image(torch.float32, noise=0.3)
    labels, _ = mgccl_ops.region_merge(feat, "auto", linkage=linkage)
    if linkage == "average":
        assert torch.equal(labels, truth)
    else:
        # Single linkage cuts the within-block edges below the threshold; blocks may lose a
        # few isolated pixels but never merge with each other.
        for region in labels.unique():
            assert truth[labels == region].unique().numel() == 1


def features_with_ties(draw, max_side=7):
    """Small images whose features come from a few integer values: exact ties and zero vectors."""
    batch = draw(st.integers(1, 2))
    channels = draw(st.integers(1, 4))
    height = draw(st.integers(1, max_side))
    width = draw(st.integers(1, max_side))
    seed = draw(st.integers(0, 2**16))
    values = torch.randint(-1, 2, (batch, channels, height, width), generator=torch.Generator().manual_seed(seed))
    return values.to(torch.float64) + draw(st.sampled_from([0.0, 0.5]))


def region_is_connected(mask: np.ndarray, connectivity: int) -> bool:
    structure = scipy.ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    return scipy.ndimage.label(mask, structure=structure)[1] == 1


@given(data=st.data(), linkage=st.sampled_from(LINKAGES), connectivity=st.sampled_from(CONNECTIVITIES))
def test_property_regions_are_connected_and_canonical(data, linkage, connectivity):
    feat = features_with_ties(data.draw)
    threshold = data.draw(st.floats(-1.0, 1.0))
    labels, num = mgccl_ops.region_merge(feat, threshold, connectivity=connectivity, linkage=linkage)
    assert_canonical(labels, num)
    for b in range(feat.shape[0]):
        for region in range(int(num[b])):
            assert region_is_connected((labels[b] == region).numpy(), connectivity), f"image {b} region {region}"


@given(data=st.data(), linkage=st.sampled_from(LINKAGES), connectivity=st.sampled_from(CONNECTIVITIES))
def test_property_threshold_extremes(data, linkage, connectivity):
    feat = features_with_ties(data.draw)
    batch, _, height, width = feat.shape
    labels, num = mgccl_ops.region_merge(feat, 1.0 + 1e-9, connectivity=connectivity, linkage=linkage)
    assert num.tolist() == [height * width] * batch
    assert torch.equal(labels, torch.arange(height * width).reshape(1, height, width).expand(batch, -1, -1))
    labels, num = mgccl_ops.region_merge(feat, -1.0, connectivity=connectivity, linkage=linkage)
    assert num.tolist() == [1] * batch
    assert not labels.any()


@given(data=st.data(), connectivity=st.sampled_from(CONNECTIVITIES))
def test_property_auto_threshold_equals_reference_with_ties(data, connectivity):
    feat = features_with_ties(data.draw)
    ours = mgccl_ops.region_auto_threshold(feat, connectivity=connectivity)
    ref = reference.region_auto_threshold(feat, connectivity=connectivity)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 5), (2, 0, 3, 3)])
@pytest.mark.parametrize("linkage", LINKAGES)
def test_empty_inputs(shape, linkage):
    labels, num = mgccl_ops.region_merge(torch.zeros(shape), 0.5, linkage=linkage)
    assert labels.shape == (shape[0], shape[2], shape[3]) and labels.dtype == torch.int64
    assert num.shape == (shape[0],)
    if shape[2] * shape[3] == 0:
        assert not num.any()
    else:  # zero channels: every feature is the zero vector, similarity 0 < 0.5
        assert num.tolist() == [shape[2] * shape[3]] * shape[0]


def test_non_contiguous_input():
    feat = random_feat((2, 7, 12, 10), seed=5)
    channels_last = feat.to(memory_format=torch.channels_last)
    for linkage in LINKAGES:
        expected = mgccl_ops.region_merge(feat, 0.1, linkage=linkage)
        got = mgccl_ops.region_merge(channels_last, 0.1, linkage=linkage)
        assert torch.equal(got[0], expected[0])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda f: mgccl_ops.region_merge(f[0], 0.5), ValueError, r"feat should be a 4-D tensor .* got 3-D"),
        (lambda f: mgccl_ops.region_merge(f, 0.5, connectivity=6), ValueError, r"connectivity .* got 6"),
        (lambda f: mgccl_ops.region_merge(f, 0.5, linkage="complete"), ValueError, r"linkage .* got 'complete'"),
        (lambda f: mgccl_ops.region_merge(f.long(), 0.5), ValueError, r"feat should be float16.*got torch.int64"),
        (lambda f: mgccl_ops.region_merge(f, "otsu"), ValueError, r"threshold .* got 'otsu'"),
        (lambda f: mgccl_ops.region_merge(f, float("nan")), ValueError, r"threshold should not be NaN"),
        (lambda f: mgccl_ops.region_merge(f, torch.zeros(3)), ValueError, r"threshold .* \[B\] = \[2\] .* got shape"),
        (lambda f: mgccl_ops.region_merge(f, torch.tensor([0.1, float("nan")])), RuntimeError, r"NaN for image 1"),
        (lambda f: mgccl_ops.region_auto_threshold(f, connectivity=3), ValueError, r"connectivity .* got 3"),
        # The kernels check their arguments too, for callers of torch.ops.mgccl directly.
        (lambda f: torch.ops.mgccl.region_merge(f, None, 5, "average"), RuntimeError, r"connectivity should be 4 or 8"),
        (lambda f: torch.ops.mgccl.region_merge(f[0], None, 4, "single"), RuntimeError, r"feat should be a 4-D"),
        (lambda f: torch.ops.mgccl.region_merge(f, None, 4, "ward"), RuntimeError, r"linkage should be"),
        (lambda f: torch.ops.mgccl.region_auto_threshold(f[0, 0], 8), RuntimeError, r"feat should be a 4-D"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(2, 3, 5, 4))


def opcheck_samples():
    feat = random_feat((2, 5, 7, 6), dtype=torch.float32, seed=6)
    yield feat, torch.tensor([0.1, 0.4], dtype=torch.float64), 4, "average"
    yield feat, None, 8, "single"
    yield feat.half(), None, 4, "average"


@pytest.mark.parametrize("sample", list(opcheck_samples()))
def test_opcheck(sample):
    torch.library.opcheck(torch.ops.mgccl.region_merge.default, sample)
    torch.library.opcheck(torch.ops.mgccl.region_auto_threshold.default, (sample[0], sample[2]))
