"""Process-group plumbing shared by the cross-rank losses: sizes, gathers, ring neighbours.

Every helper takes the ``group`` argument of the public functions (None = the default
group) and works on any backend: gloo for CPU tensors, NCCL for CUDA tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Ring:
    """A rank's place in ``group``: its group rank, the world size and the global ranks of
    the neighbours it sends to (``next``) and receives from (``prev``)."""

    group: dist.ProcessGroup | None
    rank: int
    world: int
    next: int
    prev: int


def ring_of(op: str, group: dist.ProcessGroup | None) -> Ring:
    """The calling rank's :class:`Ring` in ``group``.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"mgccl_ops.distributed.{op}: torch.distributed is not initialised; "
            "call torch.distributed.init_process_group first (or use mgccl_ops.{op} in one process)"
        )
    rank, world = dist.get_rank(group), dist.get_world_size(group)

    def global_rank(group_rank: int) -> int:
        return group_rank if group is None else dist.get_global_rank(group, group_rank)

    return Ring(group, rank, world, global_rank((rank + 1) % world), global_rank((rank - 1) % world))


def gather_ints(ring: Ring, values: list[int], device: torch.device) -> list[list[int]]:
    """``values`` (the same number on every rank) of every rank, in group-rank order."""
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(ring.world)]
    dist.all_gather(parts, mine, group=ring.group)
    return [part.tolist() for part in parts]


def all_gather_rows(ring: Ring, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenation of every rank's ``x`` [sizes[r], ...] along dim 0 (no gradient).

    Shards are padded to the largest size for the collective (gloo needs equal sizes).
    """
    longest = max(sizes)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(ring.world)]
    dist.all_gather(parts, padded.contiguous(), group=ring.group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


class _GatherRowsWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every rank's gradient of the gathered
    tensor (an all-reduce) and returns the caller's own rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, ring: Ring, sizes: list[int]) -> torch.Tensor:
        ctx.ring, ctx.offset, ctx.n = ring, sum(sizes[: ring.rank]), x.shape[0]
        return all_gather_rows(ring, x.detach(), sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.ring.group)
        return total[ctx.offset : ctx.offset + ctx.n], None, None


def gather_rows_with_grad(ring: Ring, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """[sum(sizes), ...]: every rank's ``x`` concatenated; the gradient of the result on all
    ranks flows back, summed, into each rank's own ``x``."""
    return _GatherRowsWithGrad.apply(x, ring, sizes)


def all_reduce_sum(ring: Ring, x: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``x`` summed over the ranks."""
    total = x.detach().clone()
    dist.all_reduce(total, group=ring.group)
    return total


def collective_device(ring: Ring) -> torch.device:
    """Where the group's small bookkeeping tensors live: the current GPU for NCCL, else the CPU."""
    if dist.get_backend(ring.group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(ring: Ring, op: str, check: Callable[[], tuple[T, list[int]]], width: int) -> tuple[T, list[list[int]]]:
    """Runs this rank's argument checks and, in one collective, tells every rank whether any
    rank's failed and gathers the ``width`` ints each check returns (e.g. its shard's shape).
    A bad input on one rank so raises on every rank instead of leaving the others waiting in a
    later collective.

    Args:
        check: returns ``(result, ints)`` with ``len(ints) == width``, or raises ValueError /
            TypeError.

    Returns:
        ``(result, ints of every rank in group-rank order)``.

    Raises:
        ValueError or TypeError: this rank's own check failed (its message).
        ValueError: another rank's check failed, naming that rank.
    """
    try:
        (result, ints), failure = check(), None
    except (ValueError, TypeError) as error:
        result, ints, failure = None, [0] * width, error
    everyone = gather_ints(ring, [int(failure is not None), *ints], collective_device(ring))
    if failure is not None:
        raise failure
    failed = [rank for rank, (flag, *_) in enumerate(everyone) if flag]
    if failed:
        raise ValueError(
            f"mgccl_ops.distributed.{op}: the inputs of rank(s) {failed} failed their checks (their own "
            "errors say why); no rank ran the op"
        )
    return result, [values for _, *values in everyone]
