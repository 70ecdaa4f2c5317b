"""Benchmark of ``multi_grained_loss`` (forward + backward) against the same losses in plain PyTorch.

The training shape of DESIGN.md: a batch of B image-caption pairs with E = 5 entity phrases
each gives a key bank of B * E entity embeddings and three query levels, B, B * 4 and
B * 196 rows (D = 256), each with its positive entity and the entity's phrase as group.
Providers:

- ``mgccl``: one ``multi_grained_loss`` call (all levels in one pass over the key bank);
- ``pytorch``: ``mgccl_ops.reference.multi_grained_loss`` for the full softmax (per level the
  N_l x M logits and their log-sum-exp); with hard negatives, plain PyTorch mining by
  ``torch.topk`` over the masked N_l x M similarities (the reference's stable sort would be
  slower) and the reference hard-negative loss, which gathers the [N_l, K, D] keys.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

import mgccl_ops
from mgccl_ops import reference
from mgccl_ops.bench import harness, report

NAME = "multi_grained"
LEVEL_FACTORS = (1, 4, 196)  # object/caption, part, pixel rows per image
ENTITIES = 5
PHRASES = 400  # distinct phrase groups in the bank
# The table columns that say which case a row is (with the GPU benchmark's).
SHAPE_COLUMNS = (("provider", "provider"), ("B", "params.batch"), ("query rows", "params.rows"), ("keys", "params.m"))


def _inputs(batch: int, d: int, seed: int = 0, device: str = "cpu"):
    generator = torch.Generator().manual_seed(seed)
    m = batch * ENTITIES

    def unit_rows(n: int) -> torch.Tensor:
        rows = torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=1)
        return rows.to(device).requires_grad_()

    k = unit_rows(m)
    k_group = torch.randint(0, PHRASES, (m,), generator=generator).to(device)
    levels = []
    for factor in LEVEL_FACTORS:
        q = unit_rows(batch * factor)
        pos = torch.randint(0, m, (batch * factor,), generator=generator).to(device)
        levels.append((q, pos, 1.0, k_group[pos]))
    logit_scale = torch.tensor(2.659, device=device, requires_grad=True)
    return levels, k, k_group, logit_scale


def plain_hard_negative_loss(levels, k, scale, k_group, hard_negatives):
    """Plain PyTorch: per level, topk mining over the masked similarities, then the gathered loss."""
    total = 0.0
    for q, pos, weight, q_group in levels:
        with torch.no_grad():
            sim = q @ k.T
            sim.masked_fill_(q_group[:, None] == k_group[None, :], float("-inf"))
            sim.scatter_(1, pos[:, None], float("-inf"))
            neg_idx = torch.topk(sim, hard_negatives, dim=1).indices
        total = total + weight * reference.hard_negative_loss(q, k, pos, neg_idx, scale)
    return total


def loss_step(provider: str, batch: int, d: int, hard_negatives: int | None, device: str = "cpu") -> Callable[[], None]:
    """Setup factory: the three levels and the key bank on ``device``; the step runs forward + backward."""
    return step_of(provider, *_inputs(batch, d, device=device), hard_negatives)


def step_of(provider: str, levels, k, k_group, logit_scale, hard_negatives: int | None) -> Callable[[], None]:
    """Forward + backward of the total loss by ``provider`` (``hard_negatives``: K, or None for the
    full softmax) over the levels (q, pos, weight, q_group) against the bank k [M, D] with groups
    k_group [M]; the gradients of the queries, k and logit_scale are cleared after each step."""
    leaves = [level[0] for level in levels] + [k, logit_scale]

    def forward():
        scale = logit_scale.exp()
        if provider == "mgccl":
            return mgccl_ops.multi_grained_loss(levels, k, scale, k_group=k_group, hard_negatives=hard_negatives)[0]
        if hard_negatives is None:
            return reference.multi_grained_loss(levels, k, scale, k_group=k_group)[0]
        return plain_hard_negative_loss(levels, k, scale, k_group, hard_negatives)

    def step():
        forward().backward()
        for leaf in leaves:
            leaf.grad = None

    return step


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hard-negatives", type=int, nargs="+", default=[0, 16], help="0: full softmax")
    parser.add_argument("--device", default="cpu")
    harness.add_output_arguments(parser)


def run(args: argparse.Namespace) -> list[dict]:
    context = harness.run_context(args.device)
    factory = "mgccl_ops.bench.multi_grained:loss_step"
    rows = []
    for hard_negatives in args.hard_negatives:
        mode = "full softmax" if hard_negatives == 0 else f"K={hard_negatives}"
        for batch in args.batches:
            for provider in ("mgccl", "pytorch"):
                params = {
                    "provider": provider,
                    "batch": batch,
                    "d": args.dim,
                    "hard_negatives": hard_negatives or None,
                    "device": args.device,
                }
                row_params = {
                    "batch": batch,
                    "rows": [batch * f for f in LEVEL_FACTORS],
                    "m": batch * ENTITIES,
                    "d": args.dim,
                    "hard_negatives": hard_negatives or None,
                }
                row = harness.measure_case(
                    NAME,
                    f"{provider} ({mode})",
                    factory,
                    params,
                    row_params,
                    context,
                    device=args.device,
                    repeats=args.repeats,
                )
                rows.append(row)
                timing = row["time_ms"]
                print(
                    f"{row['provider']:22s} B={batch:4d}  {timing['median']:9.1f} ms "
                    f"(p20 {timing['p20']:.1f}, p80 {timing['p80']:.1f})  peak {row['peak_mem_mib']} MiB",
                    flush=True,
                )
    report.add_ratios_to_pytorch(rows, "batch")
    report.write_report(
        rows,
        args.out,
        NAME,
        f"multi_grained_loss forward + backward, levels B x (1, 4, 196), bank 5B, D = {args.dim}, float32, "
        f"{context['device_name']}",
        columns=[
            *SHAPE_COLUMNS,
            *report.TIME_COLUMNS,
            ("time / pytorch", "time_vs_pytorch"),
            ("peak MiB", "peak_mem_mib"),
            ("pytorch peak / peak", "memory_saving"),
        ],
        x_key="batch",
        notes=(
            f"mgccl_ops {context['version']}, torch {context['torch']}. One step = forward + backward of "
            "the total over three levels (B, 4B and 196B queries) against a bank of 5B keys, gradients to "
            f"every level, the keys and the logit scale. Median of {args.repeats} runs after one warm-up; "
            "peak memory is the growth of the process's resident set during one step, in a fresh process "
            "(inputs excluded)."
        ),
    )
    return rows
