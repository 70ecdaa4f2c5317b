"""The ops from several Python threads at once: they release the GIL while their kernels run, and
concurrent calls (backward included) give bit-for-bit the results of the same calls made alone."""

from __future__ import annotations

import functools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import mgccl_ops


def inputs(seed: int, n: int = 96, m: int = 80, d: int = 24, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=generator, dtype=dtype)
    k = torch.randn(m, d, generator=generator, dtype=dtype)
    pos = torch.randint(-1, m, (n,), generator=generator)
    weight = torch.rand(n, generator=generator, dtype=dtype)
    return q, k, pos, weight


def permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def loss_job(name: str, seed: int):
    """A forward and backward: returns (loss, grad_q, grad_k, grad_scale)."""

    def run():
        q, k, pos, weight = inputs(seed)
        q.requires_grad_()
        k.requires_grad_()
        scale = torch.tensor(2.5, requires_grad=True)
        if name == "contrastive_mean":
            loss = mgccl_ops.contrastive_loss(q, k, pos, scale, weight=weight)
        elif name == "contrastive_none":
            loss = mgccl_ops.contrastive_loss(q, k, pos, scale, reduction="none").sum()
        elif name == "contrastive_symmetric":
            loss = mgccl_ops.contrastive_loss(q[:80], k, permutation(80, seed), scale, symmetric=True)
        elif name == "hard_negative":
            neg_idx, _ = mgccl_ops.topk_hard_negatives(q, k, 7, pos=pos)
            loss = mgccl_ops.hard_negative_loss(q, k, pos, neg_idx, scale, weight=weight, reduction="sum")
        elif name == "multi_grained":
            levels = [(q[:50], pos[:50], 1.0), (q[50:], pos[50:], 0.5)]
            loss, _ = mgccl_ops.multi_grained_loss(levels, k, scale, hard_negatives=5)
        grads = torch.autograd.grad(loss, (q, k, scale), allow_unused=True)
        return (loss.detach(), *[torch.zeros(()) if g is None else g for g in grads])

    return run


def region_job(name: str, seed: int):
    def run():
        generator = torch.Generator().manual_seed(seed)
        feat = torch.randn(3, 6, 24, 20, generator=generator)
        if name == "merge_single":
            return mgccl_ops.region_merge(feat, "auto", linkage="single", connectivity=8)
        if name == "merge_average":
            return mgccl_ops.region_merge(feat, 0.1, linkage="average")
        labels, num = mgccl_ops.region_merge(feat, 0.2)
        x = feat.clone().requires_grad_()
        pooled = mgccl_ops.region_pool(x, labels, num)
        back = mgccl_ops.region_broadcast(pooled * 2, labels)
        (grad,) = torch.autograd.grad(back.square().sum(), x)
        return pooled.detach(), back.detach(), grad

    return run


JOBS = {
    **{
        f"{name}-{seed}": loss_job(name, seed)
        for name in (
            "contrastive_mean",
            "contrastive_none",
            "contrastive_symmetric",
            "hard_negative",
            "multi_grained",
        )
        for seed in (0, 1)
    },
    **{
        f"{name}-{seed}": region_job(name, seed)
        for name in ("merge_single", "merge_average", "pool")
        for seed in (2, 3)
    },
}


def identical(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(x.nan_to_num(), y.nan_to_num()) for x, y in zip(a, b)
    )


def test_concurrent_calls_equal_serial_calls_bit_for_bit():
    serial = {name: job() for name, job in JOBS.items()}
    names = list(JOBS) * 3

    def run(name):
        return name, JOBS[name]()

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, names))
    for name, result in results:
        assert identical(result, serial[name]), f"{name}: a concurrent call differs from the serial one"


def long_topk_call():
    """A raw topk_hard_negatives call that takes at least 0.3 s on this machine."""
    n = 2048
    while True:
        q, k = torch.randn(n, 64), torch.randn(n, 64)
        start = time.perf_counter()
        torch.ops.mgccl.topk_hard_negatives(q, k, 16, None, None, None)
        if time.perf_counter() - start > 0.3 or n >= 2**16:
            return functools.partial(torch.ops.mgccl.topk_hard_negatives, q, k, 16, None, None, None)
        n *= 2


@pytest.mark.parametrize("through", ["raw_op", "wrapper_with_backward"])
def test_the_gil_is_released_while_a_kernel_runs(through):
    """While one thread runs a long kernel, another keeps running Python code. Were the GIL held
    for the kernel's duration, the other thread's ticks would show a gap as long as the kernel."""
    if through == "raw_op":
        call = long_topk_call()
    else:
        q, k, pos, _ = inputs(0, n=3000, m=3000, d=256)

        def call():
            qq = q.clone().requires_grad_()
            loss = mgccl_ops.contrastive_loss(qq, k, pos, 2.0, symmetric=False, reduction="none").sum()
            loss.backward()

    window = {}

    def worker():
        window["start"] = time.perf_counter()
        call()
        window["end"] = time.perf_counter()

    thread = threading.Thread(target=worker)
    ticks = []
    thread.start()
    while thread.is_alive():
        ticks.append(time.perf_counter())
        time.sleep(0.001)
    thread.join()
    duration = window["end"] - window["start"]
    inside = [t for t in ticks if window["start"] <= t <= window["end"]]
    edges = [window["start"], *inside, window["end"]]
    longest_gap = max(b - a for a, b in zip(edges, edges[1:]))
    assert len(inside) >= 5 and longest_gap < 0.5 * duration, (
        f"the other thread ran {len(inside)} times in a {duration:.3f} s kernel call, longest pause "
        f"{longest_gap:.3f} s: the call holds the GIL"
    )
