"""Argument handling shared by the open_clip drop-in losses."""

from __future__ import annotations

import torch


def scalar_parameter(module: str, name: str, value: float | torch.Tensor) -> float | torch.Tensor:
    """``logit_scale`` / ``logit_bias`` as the ops take them: a float or a 0-dim tensor.

    open_clip models hold them as 0-dim parameters, but a one-element tensor (shape [1]) also
    works there by broadcasting, so it is accepted and viewed as 0-dim (its gradient flows).
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{module}: {name} should be a scalar (0-dim tensor or float), got shape {tuple(value.shape)}"
            )
        return value.reshape(())
    return value


def check_distributed(module: str, rank: int, world_size: int, use_horovod: bool = False) -> None:
    """Validates the open_clip distributed arguments of a loss module's constructor."""
    if use_horovod:
        raise ValueError(f"{module}: use_horovod=True is not supported; use torch.distributed (world_size > 1)")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"{module}: world_size should be an int >= 1, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"{module}: rank should lie in [0, world_size = {world_size}), got {rank!r}")


def rank_and_sizes(module: str, rank: int, world_size: int, rows: int, device: torch.device):
    """The process group's view for a world_size > 1 call: (ring, every rank's row count).

    Checks that torch.distributed runs with the world size and rank the module was built with.
    """
    from mgccl_ops.distributed.comm import gather_ints, ring_of

    ring = ring_of(module, None)
    if (ring.world, ring.rank) != (world_size, rank):
        raise ValueError(
            f"{module}: built with rank={rank}, world_size={world_size} but torch.distributed runs "
            f"rank {ring.rank} of {ring.world}"
        )
    return ring, [size for (size,) in gather_ints(ring, [rows], device)]
