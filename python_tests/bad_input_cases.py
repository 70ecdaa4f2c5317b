"""The bad-input sweep's cases: malformed and edge-case calls of every op.

Each case is a function of the implementation (``mgccl_ops`` or ``mgccl_ops.reference``) that
builds its inputs afresh (seeded) and returns a tuple of tensors: the op's outputs and, for the
differentiable ops, the gradients of their sum. A case passes when the call raises a clear
error (``ValueError``, ``RuntimeError`` or, for a wrong Python type, ``TypeError``, with a
message that names the op) or returns what the reference returns. Cases marked ``must_raise``
are malformed: only a clear error passes. Cases named ``raw-*`` call ``torch.ops.mgccl`` directly,
past the wrappers' checks, so that the kernels' own checks are swept too.

The cases run in worker processes (``bad_input_worker.py``), so a crash fails its case only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

INF = float("inf")
NAN = float("nan")
BIG = 2**31 + 5  # past 32-bit index math
HUGE = 2**62


class Case(NamedTuple):
    op: str  # the op the error message must name
    run: Callable  # impl -> tuple of tensors
    must_raise: bool
    # Non-finite data or weights: the forward outputs must equal the reference's, NaN for NaN,
    # but gradients only where both are finite (docs/ops.md, "Non-finite data": which
    # gradient entries an infinity turns into NaN is not part of the contract).
    nonfinite: bool
    # The dtype whose tolerance applies when it is looser than the outputs' own (float64
    # thresholds computed from float32 similarities, say).
    tolerance: torch.dtype | None = None


CASES: dict[str, Case] = {}


def case(name: str, op: str, run: Callable, must_raise: bool = False, tolerance=None) -> None:
    if name in CASES:
        raise KeyError(f"duplicate case {name}")
    CASES[name] = Case(op, run, must_raise, "-inf" in name or "-nan" in name, tolerance)


def randn(*shape, dtype=torch.float32, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed + 7 * len(shape) + sum(shape) % 97)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype).to(device)


def with_grads(outputs, leaves) -> tuple:
    """outputs (a tensor or tuple) followed by d(sum of floating outputs)/d leaves (zeros when a
    leaf is not used)."""
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    floating = [o for o in outputs if o.is_floating_point() and o.requires_grad]
    leaves = [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]
    if not floating or not leaves:
        return outputs
    total = sum(o.sum() for o in floating)
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    return outputs + tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves))


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_() if t.is_floating_point() and t.device.type != "meta" else t


# --- contrastive_loss --------------------------------------------------------------------------


def contrastive_args(n=6, m=5, d=4, dtype=torch.float32):
    q, k = randn(n, d, dtype=dtype), randn(m, d, dtype=dtype, seed=1)
    pos = torch.arange(n) % max(m, 1) if m > 0 else torch.full((n,), -1)
    if n > 1 and m > 0:
        pos[1] = -1
    scale = torch.tensor(1.5, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return {"q": q, "k": k, "pos": pos, "scale": scale}


def contrastive_case(name, must_raise=False, **changes):
    """A contrastive_loss call; ``changes`` maps argument names to values or to functions of the
    default arguments."""

    def run(impl):
        args = contrastive_args(**shape)
        kwargs = {}
        for key, value in changes.items():
            value = value(args) if callable(value) else value
            if key in ("q", "k", "pos", "scale"):
                args[key] = value
            else:
                kwargs[key] = value
        args = {key: leaf(v) if key in ("q", "k") and isinstance(v, torch.Tensor) else v for key, v in args.items()}
        out = impl.contrastive_loss(args["q"], args["k"], args["pos"], args["scale"], **kwargs)
        return with_grads(out, [args["q"], args["k"]])

    shape = changes.pop("shape", {})
    case(f"contrastive_loss-{name}", "contrastive_loss", run, must_raise)


def hard_negative_args(n=6, m=5, d=4, kneg=3, dtype=torch.float32):
    args = contrastive_args(n, m, d, dtype)
    generator = torch.Generator().manual_seed(5)
    args["neg_idx"] = (
        torch.randint(-1, max(m, 1), (n, kneg), generator=generator) if m > 0 else torch.full((n, kneg), -1)
    )
    return args


def hard_negative_case(name, must_raise=False, **changes):
    shape = changes.pop("shape", {})

    def run(impl):
        args = hard_negative_args(**shape)
        kwargs = {}
        for key, value in changes.items():
            value = value(args) if callable(value) else value
            if key in args:
                args[key] = value
            else:
                kwargs[key] = value
        q, k = leaf(args["q"]), leaf(args["k"])
        out = impl.hard_negative_loss(q, k, args["pos"], args["neg_idx"], args["scale"], **kwargs)
        return with_grads(out, [q, k])

    case(f"hard_negative_loss-{name}", "hard_negative_loss", run, must_raise)


def topk_case(name, must_raise=False, **changes):
    shape = changes.pop("shape", {})

    def run(impl):
        n, m, d = shape.get("n", 6), shape.get("m", 7), shape.get("d", 4)
        dtype = shape.get("dtype", torch.float32)
        args = {"q": randn(n, d, dtype=dtype), "k": randn(m, d, dtype=dtype, seed=1), "num": min(3, m)}
        kwargs = {}
        for key, value in changes.items():
            value = value(args) if callable(value) else value
            if key in args:
                args[key] = value
            else:
                kwargs[key] = value
        return impl.topk_hard_negatives(args["q"], args["k"], args["num"], **kwargs)

    case(f"topk_hard_negatives-{name}", "topk_hard_negatives", run, must_raise)


def multi_grained_case(name, must_raise=False, levels=None, hard_negatives=None, **changes):
    def run(impl):
        k = leaf(randn(6, 4, seed=3))
        q0, q1 = leaf(randn(5, 4, seed=4)), leaf(randn(3, 4, seed=5))
        built = [(q0, torch.tensor([0, 1, -1, 5, 2]), 1.0), (q1, torch.tensor([3, -1, 4]), 0.5)]
        args = {"k": k, "scale": 2.0}
        if levels is not None:
            built = levels(built)
        for key, value in changes.items():
            args[key] = value(args) if callable(value) else value
        kwargs = {key: v for key, v in args.items() if key not in ("k", "scale")}
        total, per_level = impl.multi_grained_loss(
            built, args["k"], args["scale"], hard_negatives=hard_negatives, **kwargs
        )
        return with_grads((total, per_level), [k, q0, q1])

    case(f"multi_grained_loss-{name}", "multi_grained_loss", run, must_raise)


def region_merge_case(name, feat, must_raise=False, threshold="auto", **kwargs):
    def run(impl):
        f = feat() if callable(feat) else feat
        thr = threshold() if callable(threshold) else threshold
        return impl.region_merge(f, thr, **kwargs)

    case(f"region_merge-{name}", "region_merge", run, must_raise)


def auto_threshold_case(name, feat, must_raise=False, **kwargs):
    def run(impl):
        return (impl.region_auto_threshold(feat() if callable(feat) else feat, **kwargs),)

    tolerance = None if "float64" in name else torch.float32  # similarities in float32
    case(f"region_auto_threshold-{name}", "region_auto_threshold", run, must_raise, tolerance)


def pool_inputs(b=2, c=3, h=4, w=5, dtype=torch.float32):
    x = randn(b, c, h, w, dtype=dtype, seed=9)
    labels = (torch.arange(h * w).reshape(1, h, w) // 3).expand(b, h, w).contiguous() if h * w > 0 else None
    if labels is None:
        labels = torch.zeros(b, h, w, dtype=torch.int64)
    num = labels.reshape(b, h * w).amax(1) + 1 if h * w > 0 else torch.zeros(b, dtype=torch.int64)
    return {"x": x, "labels": labels, "num": num}


def region_pool_case(name, must_raise=False, **changes):
    shape = changes.pop("shape", {})

    def run(impl):
        args = pool_inputs(**shape)
        for key, value in changes.items():
            args[key] = value(args) if callable(value) else value
        x = leaf(args["x"]) if isinstance(args["x"], torch.Tensor) else args["x"]
        return with_grads(impl.region_pool(x, args["labels"], args["num"]), [x])

    case(f"region_pool-{name}", "region_pool", run, must_raise)


def region_broadcast_case(name, must_raise=False, **changes):
    shape = changes.pop("shape", {})

    def run(impl):
        args = pool_inputs(**shape)
        regions = int(args["num"].max()) if args["num"].numel() else 0
        args["pooled"] = randn(args["x"].shape[0], regions, args["x"].shape[1], seed=11)
        for key, value in changes.items():
            args[key] = value(args) if callable(value) else value
        pooled = leaf(args["pooled"]) if isinstance(args["pooled"], torch.Tensor) else args["pooled"]
        return with_grads(impl.region_broadcast(pooled, args["labels"]), [pooled])

    case(f"region_broadcast-{name}", "region_broadcast", run, must_raise)


def semantic_unit_case(name, must_raise=False, **changes):
    def run(impl):
        args = {"pixel_feat": randn(2, 4, 5, 6, seed=12), "text_emb": randn(3, 4, seed=13), "threshold": 0.2}
        for key, value in changes.items():
            args[key] = value(args) if callable(value) else value
        feat = args.pop("pixel_feat")
        text = args.pop("text_emb")
        return (impl.adaptive_semantic_unit(feat, text, **args),)

    case(f"adaptive_semantic_unit-{name}", "adaptive_semantic_unit", run, must_raise)


def raw_case(name, op, call):
    """A call of torch.ops.mgccl.<op> past the wrapper: only a clear error passes."""
    case(f"raw-{name}", op, lambda impl: call(), True)


def meta(t: torch.Tensor) -> torch.Tensor:
    return t.to("meta")


def channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def expanded_rows(t: torch.Tensor) -> torch.Tensor:
    """The first row of t repeated with stride 0."""
    return t[:1].expand_as(t)


def with_value(t: torch.Tensor, index, value) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


# The losses share most of their malformed calls.
for loss_case in (contrastive_case, hard_negative_case):
    # Wrong ranks.
    loss_case("q-1d", True, q=lambda a: a["q"][0])
    loss_case("q-3d", True, q=lambda a: a["q"][None])
    loss_case("k-1d", True, k=lambda a: a["k"][0])
    loss_case("pos-2d", True, pos=lambda a: a["pos"][:, None])
    loss_case("pos-0d", True, pos=lambda a: a["pos"][0])
    loss_case("scale-1d", True, scale=lambda a: a["scale"].reshape(1))
    loss_case("weight-2d", True, weight=lambda a: torch.ones(6, 1))
    # Wrong sizes.
    loss_case("k-width", True, k=lambda a: a["k"][:, :3])
    loss_case("pos-length", True, pos=lambda a: a["pos"][:4])
    loss_case("weight-length", True, weight=lambda a: torch.ones(5))
    # Wrong dtypes.
    loss_case("q-int", True, q=lambda a: a["q"].int(), k=lambda a: a["k"].int())
    loss_case("q-bool", True, q=lambda a: a["q"] > 0, k=lambda a: a["k"] > 0)
    loss_case("k-float64", True, k=lambda a: a["k"].double())
    loss_case("pos-int32", True, pos=lambda a: a["pos"].int())
    loss_case("pos-float", True, pos=lambda a: a["pos"].float())
    loss_case("scale-int-tensor", True, scale=torch.tensor(2))
    loss_case("scale-str", True, scale="2.0")
    loss_case("weight-int", True, weight=lambda a: torch.ones(6, dtype=torch.int64))
    loss_case("reduction-bad", True, reduction="avg")
    loss_case("reduction-none-type", True, reduction=None)
    # Meta devices: one argument, or all of them (then the fake impl answers with shapes).
    loss_case("q-meta", True, q=lambda a: meta(a["q"]))
    loss_case("k-meta", True, k=lambda a: meta(a["k"]))
    loss_case("pos-meta", True, pos=lambda a: meta(a["pos"]))
    loss_case("scale-meta", True, scale=lambda a: meta(a["scale"]))
    loss_case("weight-meta", True, weight=lambda a: torch.ones(6, device="meta"))
    loss_case(
        "all-meta",
        q=lambda a: meta(a["q"]),
        k=lambda a: meta(a["k"]),
        pos=lambda a: meta(a["pos"]),
        scale=lambda a: meta(a["scale"]),
    )
    # Empty dimensions.
    loss_case("n0", shape={"n": 0})
    loss_case("m0", shape={"m": 0})
    loss_case("d0", shape={"d": 0})
    loss_case("n0-m0-d0", shape={"n": 0, "m": 0, "d": 0})
    loss_case("n1-m1", shape={"n": 1, "m": 1})
    # Layouts.
    loss_case("q-transposed", q=lambda a: a["q"].T.contiguous().T)
    loss_case("q-strided", q=lambda a: randn(6, 8)[:, ::2])
    loss_case("k-expanded", k=lambda a: expanded_rows(a["k"]))
    loss_case("q-expanded", q=lambda a: expanded_rows(a["q"]))
    loss_case("pos-expanded", pos=lambda a: torch.tensor([2]).expand(6))
    loss_case("pos-strided", pos=lambda a: torch.arange(12)[::2] % 5)
    # Out-of-range and extreme indices.
    loss_case("pos-m", True, pos=lambda a: with_value(a["pos"], 0, 5))
    loss_case("pos-minus-2", True, pos=lambda a: with_value(a["pos"], 0, -2))
    loss_case("pos-huge", True, pos=lambda a: with_value(a["pos"], 0, HUGE))
    loss_case("pos-int64-min", True, pos=lambda a: with_value(a["pos"], 0, -(2**63)))
    loss_case("pos-int64-max", True, pos=lambda a: with_value(a["pos"], 0, 2**63 - 1))
    loss_case("pos-all-ignored", pos=lambda a: torch.full((6,), -1))
    # NaN / inf data, scales and weights.
    loss_case("q-nan", q=lambda a: with_value(a["q"], (0, 0), NAN))
    loss_case("q-inf", q=lambda a: with_value(a["q"], (2, 1), INF))
    loss_case("k-minus-inf", k=lambda a: with_value(a["k"], (3, 0), -INF))
    loss_case("scale-inf", True, scale=INF)
    loss_case("scale-nan", True, scale=NAN)
    loss_case("scale-inf-tensor", True, scale=torch.tensor(INF))
    loss_case("scale-nan-tensor", True, scale=torch.tensor(NAN))
    loss_case("scale-zero", scale=0.0)
    loss_case("scale-negative", scale=-3.0)
    loss_case("scale-huge", scale=1e30)
    loss_case("scale-float64-tensor", scale=torch.tensor(1.5, dtype=torch.float64))
    loss_case("weight-nan", weight=lambda a: with_value(torch.ones(6), 2, NAN))
    loss_case("weight-negative", weight=lambda a: torch.linspace(-1, 1, 6))
    loss_case("weight-zero-sum", weight=lambda a: torch.tensor([1.0, 5.0, -1.0, 0.0, 0.0, 0.0]))
    loss_case("weight-inf", weight=lambda a: with_value(torch.ones(6), 3, INF))
    loss_case("weight-float64", weight=lambda a: torch.ones(6, dtype=torch.float64))
    for reduction in ("sum", "none"):
        loss_case(f"{reduction}-weight-nan", reduction=reduction, weight=lambda a: with_value(torch.ones(6), 2, NAN))
        loss_case(f"{reduction}-n0", reduction=reduction, shape={"n": 0})
        loss_case(f"{reduction}-m0", reduction=reduction, shape={"m": 0})
    # Low precision and float64.
    loss_case("float16", shape={"dtype": torch.float16})
    loss_case("bfloat16", shape={"dtype": torch.bfloat16})
    loss_case("float64", shape={"dtype": torch.float64})
    # Sizes past 32-bit index math, on meta (the fake impl must not overflow either).
    loss_case(
        "meta-n-past-int32",
        q=lambda a: torch.empty(BIG, 4, device="meta"),
        k=lambda a: meta(a["k"]),
        pos=lambda a: torch.empty(BIG, dtype=torch.int64, device="meta"),
        scale=lambda a: meta(a["scale"]),
    )

contrastive_case("symmetric-n-ne-m", True, symmetric=True)
contrastive_case("symmetric-not-permutation", True, symmetric=True, shape={"n": 5}, pos=torch.tensor([0, 0, 1, 2, 3]))
contrastive_case("symmetric-minus-1", True, symmetric=True, shape={"n": 5}, pos=torch.tensor([0, -1, 1, 2, 3]))
contrastive_case("symmetric-ok", symmetric=True, shape={"n": 5}, pos=torch.tensor([4, 0, 1, 3, 2]))
contrastive_case("symmetric-n0", symmetric=True, shape={"n": 0, "m": 0}, pos=torch.zeros(0, dtype=torch.int64))
contrastive_case("symmetric-type", True, symmetric="yes")

hard_negative_case("neg-1d", True, neg_idx=lambda a: a["neg_idx"][0])
hard_negative_case("neg-rows", True, neg_idx=lambda a: a["neg_idx"][:4])
hard_negative_case("neg-int32", True, neg_idx=lambda a: a["neg_idx"].int())
hard_negative_case("neg-meta", True, neg_idx=lambda a: meta(a["neg_idx"]))
hard_negative_case("neg-m", True, neg_idx=lambda a: with_value(a["neg_idx"], (0, 0), 5))
hard_negative_case("neg-minus-2", True, neg_idx=lambda a: with_value(a["neg_idx"], (0, 0), -2))
hard_negative_case("neg-huge", True, neg_idx=lambda a: with_value(a["neg_idx"], (1, 2), HUGE))
hard_negative_case("neg-int64-min", True, neg_idx=lambda a: with_value(a["neg_idx"], (1, 2), -(2**63)))
hard_negative_case("k0-negatives", neg_idx=lambda a: torch.zeros(6, 0, dtype=torch.int64))
hard_negative_case("neg-all-padding", neg_idx=lambda a: torch.full((6, 3), -1))
hard_negative_case("neg-duplicates", neg_idx=lambda a: torch.full((6, 4), 2))
hard_negative_case("neg-transposed", neg_idx=lambda a: a["neg_idx"].T.contiguous().T)
hard_negative_case("neg-expanded", neg_idx=lambda a: torch.tensor([[0, 1, -1]]).expand(6, 3))
hard_negative_case("neg-contains-pos", neg_idx=lambda a: a["pos"].clamp_min(0)[:, None].expand(6, 2))

# --- topk_hard_negatives ------------------------------------------------------------------------
topk_case("q-1d", True, q=lambda a: a["q"][0])
topk_case("k-3d", True, k=lambda a: a["k"][None])
topk_case("k-width", True, k=lambda a: a["k"][:, :2])
topk_case("q-int", True, q=lambda a: a["q"].long(), k=lambda a: a["k"].long())
topk_case("k-float64", True, k=lambda a: a["k"].double())
topk_case("q-meta", True, q=lambda a: meta(a["q"]))
topk_case("k-meta", True, k=lambda a: meta(a["k"]))
topk_case("all-meta", q=lambda a: meta(a["q"]), k=lambda a: meta(a["k"]))
topk_case("num-negative", True, num=-1)
topk_case("num-past-m", True, num=8)
topk_case("num-huge", True, num=HUGE)
topk_case("num-float", True, num=2.0)
topk_case("num-tensor", True, num=torch.tensor(2))
topk_case("num-bool", True, num=True)
topk_case("num-0", num=0)
topk_case("num-m", num=7)
topk_case("pos-2d", True, pos=torch.zeros(6, 1, dtype=torch.int64))
topk_case("pos-length", True, pos=torch.zeros(5, dtype=torch.int64))
topk_case("pos-int32", True, pos=torch.zeros(6, dtype=torch.int32))
topk_case("pos-m", True, pos=torch.full((6,), 7))
topk_case("pos-minus-2", True, pos=torch.full((6,), -2))
topk_case("pos-huge", True, pos=torch.full((6,), HUGE))
topk_case("pos-meta", True, pos=torch.zeros(6, dtype=torch.int64, device="meta"))
topk_case("pos-ok", pos=torch.tensor([0, -1, 6, 3, 3, 1]))
topk_case("groups-only-q", True, q_group=torch.zeros(6, dtype=torch.int64))
topk_case("groups-only-k", True, k_group=torch.zeros(7, dtype=torch.int64))
topk_case("groups-length", True, q_group=torch.zeros(6, dtype=torch.int64), k_group=torch.zeros(6, dtype=torch.int64))
topk_case("groups-float", True, q_group=torch.zeros(6), k_group=torch.zeros(7))
topk_case(
    "groups-meta",
    True,
    q_group=torch.zeros(6, dtype=torch.int64),
    k_group=torch.zeros(7, dtype=torch.int64, device="meta"),
)
topk_case("groups-ok", q_group=torch.tensor([0, 1, 2, 0, 1, 2]), k_group=torch.tensor([2, 2, 1, 0, 5, 1, -9]))
topk_case(
    "groups-extreme", q_group=torch.full((6,), -(2**63)), k_group=torch.tensor([2**63 - 1, -(2**63), 0, 1, 2, 3, 4])
)
topk_case("n0", shape={"n": 0})
topk_case("m0", shape={"m": 0})
topk_case("d0", shape={"d": 0})
topk_case("n0-m0", shape={"n": 0, "m": 0})
topk_case("q-transposed", q=lambda a: a["q"].T.contiguous().T)
topk_case("k-expanded", k=lambda a: expanded_rows(a["k"]))
topk_case("q-nan", q=lambda a: with_value(a["q"], (0, 1), NAN))
topk_case("k-inf", k=lambda a: with_value(a["k"], (2, 0), INF))
topk_case("k-minus-inf", k=lambda a: with_value(with_value(a["k"], 2, -INF), 4, -INF))
topk_case("float16", shape={"dtype": torch.float16})
topk_case("bfloat16", shape={"dtype": torch.bfloat16})
topk_case("float64", shape={"dtype": torch.float64})
topk_case("meta-n-past-int32", q=lambda a: torch.empty(BIG, 4, device="meta"), k=lambda a: meta(a["k"]))

# --- multi_grained_loss -------------------------------------------------------------------------
for hn in (None, 2):
    tag = "full" if hn is None else "hard"

    def mg(name, must_raise=False, hn=hn, tag=tag, **kwargs):
        multi_grained_case(f"{tag}-{name}", must_raise, hard_negatives=hn, **kwargs)

    mg("ok")
    mg("levels-empty", True, levels=lambda lv: [])
    mg("levels-tensor", True, levels=lambda lv: torch.zeros(2))
    mg("level-short", True, levels=lambda lv: [lv[0][:2]])
    mg("level-long", True, levels=lambda lv: [(*lv[0], None, None)])
    mg("level-q-1d", True, levels=lambda lv: [lv[0], (lv[1][0][0], lv[1][1], 0.5)])
    mg("level-q-width", True, levels=lambda lv: [lv[0], (lv[1][0][:, :3], lv[1][1], 0.5)])
    mg("level-q-float64", True, levels=lambda lv: [lv[0], (lv[1][0].double(), lv[1][1], 0.5)])
    mg("level-q-meta", True, levels=lambda lv: [lv[0], (meta(lv[1][0]), lv[1][1], 0.5)])
    mg("level-pos-length", True, levels=lambda lv: [lv[0], (lv[1][0], lv[1][1][:2], 0.5)])
    mg("level-pos-int32", True, levels=lambda lv: [lv[0], (lv[1][0], lv[1][1].int(), 0.5)])
    mg("level-pos-m", True, levels=lambda lv: [lv[0], (lv[1][0], torch.tensor([6, 0, 1]), 0.5)])
    mg("level-pos-huge", True, levels=lambda lv: [lv[0], (lv[1][0], torch.tensor([HUGE, 0, 1]), 0.5)])
    mg("level-pos-minus-2", True, levels=lambda lv: [(lv[0][0], torch.tensor([0, -2, 1, 1, 1]), 1.0), lv[1]])
    mg("level-weight-str", True, levels=lambda lv: [lv[0], (*lv[1][:2], "heavy")])
    mg("level-weight-tensor", True, levels=lambda lv: [lv[0], (*lv[1][:2], torch.tensor(0.5))])
    mg("level-weight-inf", levels=lambda lv: [lv[0], (*lv[1][:2], INF)])
    mg("level-weight-nan", levels=lambda lv: [lv[0], (*lv[1][:2], NAN)])
    mg("level-weight-negative", levels=lambda lv: [lv[0], (*lv[1][:2], -2.0)])
    mg("level-all-ignored-inf", levels=lambda lv: [lv[0], (lv[1][0], torch.full((3,), -1), INF)])
    mg("level-empty", levels=lambda lv: [lv[0], (lv[1][0][:0], lv[1][1][:0], 1.0)])
    mg("level-q-nan", levels=lambda lv: [lv[0], (with_value(lv[1][0], (0, 0), NAN), lv[1][1], 0.5)])
    mg("level-q-expanded", levels=lambda lv: [lv[0], (expanded_rows(lv[1][0]), lv[1][1], 0.5)])
    mg("level-group-without-k-group", True, levels=lambda lv: [(*lv[0], torch.zeros(5, dtype=torch.int64)), lv[1]])
    mg(
        "level-group-length",
        True,
        levels=lambda lv: [(*lv[0], torch.zeros(4, dtype=torch.int64)), lv[1]],
        k_group=torch.zeros(6, dtype=torch.int64),
    )
    mg("k-1d", True, k=lambda a: a["k"][0].detach())
    mg("k-int", True, k=lambda a: a["k"].detach().long())
    mg("k-meta", True, k=lambda a: meta(a["k"].detach()))
    mg("k-group-length", True, k_group=torch.zeros(5, dtype=torch.int64))
    mg("k-group-meta", True, k_group=torch.zeros(6, dtype=torch.int64, device="meta"))
    mg("scale-inf", True, scale=INF)
    mg("scale-nan-tensor", True, scale=torch.tensor(NAN))
    mg("scale-meta", True, scale=torch.tensor(1.0, device="meta"))
    mg("scale-1d", True, scale=torch.ones(2))
multi_grained_case("hard-negative-count", True, hard_negatives=-1)
multi_grained_case("hard-float-count", True, hard_negatives=2.0)
multi_grained_case("hard-huge-count", hard_negatives=HUGE)
multi_grained_case("hard-zero", hard_negatives=0)

# --- region_merge / region_auto_threshold -------------------------------------------------------


def feat(b=2, c=3, h=5, w=6, dtype=torch.float32):
    return lambda: randn(b, c, h, w, dtype=dtype, seed=20)


def big_expanded():
    return torch.zeros(1, 1, 1, 1).expand(1, 2, 2**16, 2**15 + 1)


for link in ("single", "average"):
    for conn in (4, 8):
        tag = f"{link}-{conn}"

        def rm(name, f, must_raise=False, link=link, conn=conn, tag=tag, **kwargs):
            region_merge_case(f"{tag}-{name}", f, must_raise, linkage=link, connectivity=conn, **kwargs)

        rm("ok", feat())
        rm("b0", feat(b=0))
        rm("c0", feat(c=0))
        rm("h0", feat(h=0))
        rm("w0", feat(w=0))
        rm("h0-w0", feat(h=0, w=0))
        rm("1x1", feat(h=1, w=1))
        rm("1xw", feat(h=1, w=7))
        rm("hx1", feat(h=7, w=1))
        rm("channels-last", lambda: channels_last(randn(2, 3, 5, 6, seed=21)))
        rm("expanded", lambda: randn(1, 3, 5, 6, seed=22).expand(3, 3, 5, 6))
        rm("transposed-hw", lambda: randn(2, 3, 6, 5, seed=23).transpose(2, 3))
        rm("inf-pixel", lambda: with_value(randn(2, 4, 5, 6, seed=24), (0, slice(None), 2, 3), INF))
        rm("nan-pixel", lambda: with_value(randn(2, 4, 5, 6, seed=25), (1, 1, 0, 0), NAN))
        rm("zero-pixel", lambda: with_value(randn(2, 4, 5, 6, seed=26), (0, slice(None), 4, 5), 0.0))
        rm("huge-values", lambda: randn(1, 4, 5, 6, seed=27) * 1e30)
        rm("float16", feat(dtype=torch.float16))
        rm("bfloat16", feat(dtype=torch.bfloat16))
        rm("float64", feat(dtype=torch.float64))
        rm("threshold-float", feat(), threshold=0.3)
        rm("threshold-minus-inf", feat(), threshold=-INF)
        rm("threshold-inf", feat(), threshold=INF)
        rm("threshold-tensor", feat(), threshold=lambda: torch.tensor([0.1, 0.9]))
        rm("threshold-0d", feat(), threshold=lambda: torch.tensor(0.4))
rm = region_merge_case
rm("feat-3d", lambda: randn(3, 5, 6), True)
rm("feat-5d", lambda: randn(1, 2, 3, 5, 6), True)
rm("feat-int", lambda: torch.ones(1, 2, 3, 3, dtype=torch.int64), True)
rm("feat-bool", lambda: torch.ones(1, 2, 3, 3, dtype=torch.bool), True)
rm("connectivity-6", feat(), True, connectivity=6)
rm("connectivity-str", feat(), True, connectivity="4")
rm("linkage-bad", feat(), True, linkage="complete")
rm("threshold-str", feat(), True, threshold="median")
rm("threshold-nan", feat(), True, threshold=NAN)
rm("threshold-nan-tensor", feat(), True, threshold=lambda: torch.tensor([0.1, NAN]))
rm("threshold-length", feat(), True, threshold=lambda: torch.tensor([0.1, 0.2, 0.3]))
rm("threshold-2d", feat(), True, threshold=lambda: torch.zeros(2, 1))
rm("threshold-int-tensor", feat(), True, threshold=lambda: torch.tensor([1, 0]))
rm("threshold-meta", feat(), True, threshold=lambda: torch.zeros(2, device="meta"))
rm("threshold-none", feat(), True, threshold=None)
rm("feat-meta", lambda: torch.empty(2, 3, 5, 6, device="meta"))
rm("pixels-past-int32", big_expanded, True, threshold=0.5)
rm("pixels-past-int32-meta", lambda: torch.empty(1, 2, 2**16, 2**15 + 1, device="meta"), threshold=0.5)
auto_threshold_case("ok", feat())
for name, f in [
    ("1x4x3x0", feat(1, 4, 3, 0)),
    ("2x4x0x0", feat(2, 4, 0, 0)),
    ("1x0x5x0", feat(1, 0, 5, 0)),
    ("b0", feat(b=0)),
    ("c0", feat(c=0)),
    ("1x1", feat(h=1, w=1)),
    ("float64-1x4x3x0", feat(1, 4, 3, 0, dtype=torch.float64)),
    ("inf-feature", lambda: with_value(randn(1, 8, 6, 7, seed=28), (0, slice(None), 2, 3), INF)),
    ("all-nan", lambda: torch.full((1, 2, 3, 3), NAN)),
    ("channels-last", lambda: channels_last(randn(2, 3, 5, 6, seed=29))),
]:
    for conn in (4, 8):
        auto_threshold_case(f"{name}-{conn}", f, connectivity=conn)
auto_threshold_case("feat-2d", lambda: randn(5, 6), True)
auto_threshold_case("connectivity-5", feat(), True, connectivity=5)
auto_threshold_case("feat-int", lambda: torch.ones(1, 1, 2, 2, dtype=torch.int32), True)
auto_threshold_case("pixels-past-int32", big_expanded, True)
auto_threshold_case("feat-meta", lambda: torch.empty(2, 3, 4, 4, device="meta"))

# --- region_pool / region_broadcast / adaptive_semantic_unit ------------------------------------
region_pool_case("ok")
region_pool_case("x-3d", True, x=lambda a: a["x"][0])
region_pool_case("x-int", True, x=lambda a: a["x"].long())
region_pool_case("x-meta", True, x=lambda a: meta(a["x"]))
region_pool_case("labels-2d", True, labels=lambda a: a["labels"][0])
region_pool_case("labels-int32", True, labels=lambda a: a["labels"].int())
region_pool_case("labels-size", True, labels=lambda a: a["labels"][:, :3])
region_pool_case("labels-batch", True, labels=lambda a: a["labels"][:1])
region_pool_case("labels-meta", True, labels=lambda a: meta(a["labels"]))
region_pool_case("labels-negative", True, labels=lambda a: with_value(a["labels"], (1, 0, 0), -1))
region_pool_case("labels-past-num", True, labels=lambda a: with_value(a["labels"], (0, 3, 4), 7))
region_pool_case("labels-huge", True, labels=lambda a: with_value(a["labels"], (0, 3, 4), HUGE))
region_pool_case("labels-int64-min", True, labels=lambda a: with_value(a["labels"], (0, 0, 0), -(2**63)))
region_pool_case("num-length", True, num=lambda a: a["num"][:1])
region_pool_case("num-2d", True, num=lambda a: a["num"][:, None])
region_pool_case("num-int32", True, num=lambda a: a["num"].int())
region_pool_case("num-meta", True, num=lambda a: meta(a["num"]))
region_pool_case("num-negative", True, num=lambda a: torch.tensor([-1, 7]))
region_pool_case("num-huge", True, num=lambda a: torch.tensor([7, 2**40]))
region_pool_case("num-int64-max", True, num=lambda a: torch.tensor([7, 2**63 - 1]))
region_pool_case("num-larger", num=lambda a: a["num"] + 3)
region_pool_case("b0", shape={"b": 0})
region_pool_case("c0", shape={"c": 0})
region_pool_case("h0", shape={"h": 0})
region_pool_case("w0", shape={"w": 0})
region_pool_case("x-channels-last", x=lambda a: channels_last(a["x"]))
region_pool_case("x-expanded", x=lambda a: a["x"][:1].expand_as(a["x"]))
region_pool_case("labels-expanded", labels=lambda a: a["labels"][:1].expand_as(a["labels"]))
region_pool_case("labels-transposed", labels=lambda a: a["labels"].transpose(1, 2).contiguous().transpose(1, 2))
region_pool_case("x-nan", x=lambda a: with_value(a["x"], (0, 1, 2, 2), NAN))
region_pool_case("x-inf", x=lambda a: with_value(a["x"], (1, 0, 0, 0), INF))
region_pool_case("float16", shape={"dtype": torch.float16})
region_pool_case("bfloat16", shape={"dtype": torch.bfloat16})
region_pool_case("float64", shape={"dtype": torch.float64})
region_broadcast_case("ok")
region_broadcast_case("pooled-2d", True, pooled=lambda a: a["pooled"][0])
region_broadcast_case("pooled-int", True, pooled=lambda a: a["pooled"].long())
region_broadcast_case("pooled-meta", True, pooled=lambda a: meta(a["pooled"]))
region_broadcast_case("labels-meta", True, labels=lambda a: meta(a["labels"]))
region_broadcast_case("labels-batch", True, labels=lambda a: a["labels"][:1])
region_broadcast_case("labels-int32", True, labels=lambda a: a["labels"].int())
region_broadcast_case("labels-past-r", True, labels=lambda a: with_value(a["labels"], (0, 0, 0), 7))
region_broadcast_case("labels-negative", True, labels=lambda a: with_value(a["labels"], (0, 0, 0), -1))
region_broadcast_case("labels-huge", True, labels=lambda a: with_value(a["labels"], (0, 0, 0), HUGE))
region_broadcast_case("r0", True, pooled=lambda a: a["pooled"][:, :0])
region_broadcast_case("b0", shape={"b": 0})
region_broadcast_case("c0", shape={"c": 0})
region_broadcast_case("h0", shape={"h": 0})
region_broadcast_case("pooled-transposed", pooled=lambda a: a["pooled"].transpose(1, 2).contiguous().transpose(1, 2))
region_broadcast_case("pooled-expanded", pooled=lambda a: a["pooled"][:1].expand_as(a["pooled"]))
region_broadcast_case("pooled-nan", pooled=lambda a: with_value(a["pooled"], (0, 0, 0), NAN))
semantic_unit_case("ok")
semantic_unit_case("auto", threshold="auto")
semantic_unit_case("text-width", True, text_emb=lambda a: a["text_emb"][:, :3])
semantic_unit_case("text-1d", True, text_emb=lambda a: a["text_emb"][0])
semantic_unit_case("text-float64", True, text_emb=lambda a: a["text_emb"].double())
semantic_unit_case("text-meta", True, text_emb=lambda a: meta(a["text_emb"]))
semantic_unit_case("feat-3d", True, pixel_feat=lambda a: a["pixel_feat"][0])
semantic_unit_case("guide-size", True, guide=lambda a: randn(2, 4, 5, 5, seed=30))
semantic_unit_case("t0", text_emb=lambda a: a["text_emb"][:0])
semantic_unit_case("b0", pixel_feat=lambda a: a["pixel_feat"][:0])
semantic_unit_case("h0", pixel_feat=lambda a: a["pixel_feat"][:, :, :0])
semantic_unit_case("feat-inf", pixel_feat=lambda a: with_value(a["pixel_feat"], (0, slice(None), 1, 1), INF))
semantic_unit_case("channels-last", pixel_feat=lambda a: channels_last(a["pixel_feat"]))
semantic_unit_case("threshold-nan", True, threshold=NAN)

# --- raw operator calls: the kernels' own checks -----------------------------------------------
ops = torch.ops.mgccl
q6, k5, pos6, s = randn(6, 4), randn(5, 4, seed=1), torch.tensor([0, 1, -1, 4, 2, 3]), torch.tensor(1.0)
no_grads = [False, False, False]
raw_case(
    "contrastive-pos-int32",
    "contrastive_loss",
    lambda: ops.contrastive_loss(q6, k5, pos6.int(), s, None, "mean", False, no_grads),
)
raw_case(
    "contrastive-pos-m",
    "contrastive_loss",
    lambda: ops.contrastive_loss(q6, k5, with_value(pos6, 0, 5), s, None, "mean", False, no_grads),
)
raw_case(
    "contrastive-reduction",
    "contrastive_loss",
    lambda: ops.contrastive_loss(q6, k5, pos6, s, None, "max", False, no_grads),
)
raw_case(
    "contrastive-scale-1d",
    "contrastive_loss",
    lambda: ops.contrastive_loss(q6, k5, pos6, s.reshape(1), None, "sum", False, no_grads),
)
raw_case(
    "contrastive-scale-int",
    "contrastive_loss",
    lambda: ops.contrastive_loss(q6, k5, pos6, torch.tensor(1), None, "sum", False, no_grads),
)
raw_case(
    "contrastive-scale-inf",
    "contrastive_loss",
    lambda: ops.contrastive_loss(q6, k5, pos6, torch.tensor(INF), None, "sum", False, no_grads),
)
raw_case(
    "contrastive-weight-int",
    "contrastive_loss",
    lambda: ops.contrastive_loss(q6, k5, pos6, s, torch.ones(6, dtype=torch.int64), "sum", False, no_grads),
)
raw_case(
    "contrastive-weight-length",
    "contrastive_loss",
    lambda: ops.contrastive_loss(q6, k5, pos6, s, torch.ones(2), "sum", False, no_grads),
)
raw_case(
    "contrastive-symmetric-repeat",
    "contrastive_loss",
    lambda: ops.contrastive_loss(q6[:5], k5, torch.tensor([0, 0, 1, 2, 3]), s, None, "sum", True, no_grads),
)
raw_case(
    "contrastive-q-int",
    "contrastive_loss",
    lambda: ops.contrastive_loss(q6.int(), k5.int(), pos6, s, None, "sum", False, no_grads),
)
raw_case(
    "contrastive-backward-row-grad",
    "contrastive_loss_backward",
    lambda: ops.contrastive_loss_backward(
        torch.ones(3), q6, k5, pos6, s, torch.zeros(6), torch.zeros(0), False, [True, True, True]
    ),
)
raw_case(
    "hard-negative-neg-m",
    "hard_negative_loss",
    lambda: ops.hard_negative_loss(q6, k5, pos6, torch.full((6, 2), 5), s, None, "sum", no_grads),
)
raw_case(
    "hard-negative-neg-int32",
    "hard_negative_loss",
    lambda: ops.hard_negative_loss(q6, k5, pos6, torch.zeros(6, 2, dtype=torch.int32), s, None, "sum", no_grads),
)
raw_case(
    "hard-negative-reduction",
    "hard_negative_loss",
    lambda: ops.hard_negative_loss(q6, k5, pos6, torch.zeros(6, 2, dtype=torch.int64), s, None, "avg", no_grads),
)
raw_case(
    "hard-negative-weight-int",
    "hard_negative_loss",
    lambda: ops.hard_negative_loss(
        q6, k5, pos6, torch.zeros(6, 2, dtype=torch.int64), s, torch.ones(6, dtype=torch.int64), "sum", no_grads
    ),
)
raw_case(
    "hard-negative-backward-neg",
    "hard_negative_loss",
    lambda: ops.hard_negative_loss_backward(torch.ones(6), q6, k5, pos6, torch.full((6, 1), 9), s, [True, True, True]),
)
raw_case("topk-num-past-m", "topk_hard_negatives", lambda: ops.topk_hard_negatives(q6, k5, 6, None, None, None))
raw_case("topk-num-negative", "topk_hard_negatives", lambda: ops.topk_hard_negatives(q6, k5, -3, None, None, None))
raw_case(
    "topk-groups-alone",
    "topk_hard_negatives",
    lambda: ops.topk_hard_negatives(q6, k5, 2, None, torch.zeros(6, dtype=torch.int64), None),
)
raw_case(
    "topk-pos-range", "topk_hard_negatives", lambda: ops.topk_hard_negatives(q6, k5, 2, torch.full((6,), 5), None, None)
)
raw_case("topk-q-int", "topk_hard_negatives", lambda: ops.topk_hard_negatives(q6.int(), k5.int(), 2, None, None, None))
raw_case(
    "region-merge-threshold-length",
    "region_merge",
    lambda: ops.region_merge(randn(2, 3, 4, 4), torch.zeros(3, dtype=torch.float64), 4, "single"),
)
raw_case(
    "region-merge-threshold-nan",
    "region_merge",
    lambda: ops.region_merge(randn(2, 3, 4, 4), torch.tensor([0.0, NAN], dtype=torch.float64), 4, "single"),
)
raw_case("region-merge-connectivity", "region_merge", lambda: ops.region_merge(randn(2, 3, 4, 4), None, 5, "single"))
raw_case("region-merge-linkage", "region_merge", lambda: ops.region_merge(randn(2, 3, 4, 4), None, 4, "ward"))
raw_case(
    "region-merge-int",
    "region_merge",
    lambda: ops.region_merge(torch.ones(2, 3, 4, 4, dtype=torch.int64), None, 4, "single"),
)
raw_case("region-auto-connectivity", "region_auto_threshold", lambda: ops.region_auto_threshold(randn(2, 3, 4, 4), 3))
raw_case(
    "region-sum-negative",
    "region_sum",
    lambda: ops.region_sum(randn(1, 2, 3, 3), torch.zeros(1, 3, 3, dtype=torch.int64), -1),
)
raw_case(
    "region-sum-huge",
    "region_sum",
    lambda: ops.region_sum(randn(1, 2, 3, 3), torch.zeros(1, 3, 3, dtype=torch.int64), 2**62),
)
raw_case("region-sum-label-range", "region_sum", lambda: ops.region_sum(randn(1, 2, 3, 3), torch.full((1, 3, 3), 4), 2))
raw_case(
    "region-pool-num-huge",
    "region_pool",
    lambda: ops.region_pool(randn(1, 2, 3, 3), torch.zeros(1, 3, 3, dtype=torch.int64), torch.tensor([2**62])),
)
raw_case(
    "region-broadcast-labels",
    "region_broadcast",
    lambda: ops.region_broadcast(randn(1, 2, 3), torch.full((1, 3, 3), 2)),
)


def _crash(impl):
    """Not a sweep case: kills its process, to test that the sweep survives a crash."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGSEGV)


CRASH_CASE = Case("none", _crash, True, False)
