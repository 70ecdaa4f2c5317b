"""Training across processes: torchrun detection, the process group, and the objective's
ops routed through :mod:`mgccl_ops.distributed`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.distributed as dist

from .. import distributed


@dataclass(frozen=True)
class RunContext:
    """Where this process stands: its rank, the world size, the device it trains on, and
    whether it started the process group (and so tears it down)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints and the log."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True under ``torchrun`` (or any launcher that sets ``WORLD_SIZE`` > 1 and ``RANK``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def start(device: str) -> RunContext:
    """The run's context; joins the process group under torchrun (gloo on the CPU, NCCL on
    CUDA, where each rank takes ``cuda:LOCAL_RANK``). Single-process runs stay as they are."""
    if not (launched_by_torchrun() or (dist.is_available() and dist.is_initialized())):
        return RunContext(device=torch.device(device))
    target = torch.device(device)
    if target.type == "cuda":
        target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(target)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return RunContext(dist.get_rank(), dist.get_world_size(), target, owns)


def stop(ctx: RunContext) -> None:
    """Leaves the process group if :func:`start` joined it."""
    if ctx.owns_group:
        dist.destroy_process_group()


def gather_objects(ctx: RunContext, obj: object) -> list:
    """``obj`` of every rank (a one-element list in a single process)."""
    if ctx.world == 1:
        return [obj]
    out = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


class GlobalPhraseIds:
    """Phrase ids that mean the same text on every rank, for the hard-negative groups.

    :meth:`update` takes this rank's batch phrases (local id = position) and agrees on one
    global numbering; :meth:`remap` translates local group ids, and any id past the local
    phrases (the objective's background key) to one shared id after the global phrases.
    """

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.table = torch.empty(0, dtype=torch.int64)
        self.count = 0

    def update(self, phrases: list[str]) -> None:
        numbering: dict[str, int] = {}
        for rank_phrases in gather_objects(self.ctx, list(phrases)):
            for phrase in rank_phrases:
                numbering.setdefault(phrase, len(numbering))
        self.table = torch.tensor([numbering[p] for p in phrases], dtype=torch.int64)
        self.count = len(numbering)

    def remap(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.table.to(ids.device)
        inside = (ids >= 0) & (ids < table.numel())
        mapped = table[ids.clamp(0, max(table.numel() - 1, 0))] if table.numel() else ids
        return torch.where(inside, mapped, torch.where(ids >= 0, torch.full_like(ids, self.count), ids))


class DistributedOps:
    """The op backend for the objective under DDP: the symmetric object-level loss and the
    multi-grained loss run across ranks (:mod:`mgccl_ops.distributed`); every other op is the
    base backend's. ``mode`` is the contrastive loss's (``"gather"`` or ``"ring"``).

    Its ops are collectives: every rank must call them, with or without data of its own.
    """

    collective = True

    def __init__(self, base: ModuleType, phrases: GlobalPhraseIds, mode: str = "gather"):
        if mode not in distributed.MODES:
            raise ValueError(f"DistributedOps: mode should be one of {distributed.MODES}, got {mode!r}")
        self.base, self.phrases, self.mode = base, phrases, mode

    def __getattr__(self, name: str):
        return getattr(self.base, name)

    def contrastive_loss(self, q, k, pos, scale, *, symmetric=False, **kwargs):
        if not symmetric or kwargs:
            return self.base.contrastive_loss(q, k, pos, scale, symmetric=symmetric, **kwargs)
        if not torch.equal(pos, torch.arange(q.shape[0], device=pos.device)):
            raise ValueError("DistributedOps.contrastive_loss: pos should be arange(N) (the CLIP diagonal)")
        return distributed.contrastive_loss(q, k, scale, mode=self.mode)

    def multi_grained_loss(self, levels, k, scale, *, k_group=None, hard_negatives=None):
        """The keys whose group id is past this rank's phrases (the objective's learned
        background key, the bank's last row) are the same on every rank: they enter the
        global bank once (``shared_keys``), as in one process."""
        remap = self.phrases.remap
        levels = [tuple(level[:3]) + tuple(remap(g) for g in level[3:]) for level in levels]
        shared = 0 if k_group is None else int((k_group >= self.phrases.table.numel()).sum())
        k_group = None if k_group is None else remap(k_group)
        return distributed.multi_grained_loss(
            levels, k, scale, k_group=k_group, hard_negatives=hard_negatives, shared_keys=shared
        )
