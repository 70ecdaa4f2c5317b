"""Ops across processes on ``torch.distributed`` (DESIGN.md section 6).

Each rank passes its local shard; the results are global (the same on every rank) and,
under DDP, the parameter gradients equal single-process training on the concatenated batch.
"""

from mgccl_ops.distributed.contrastive import MODES, contrastive_loss
from mgccl_ops.distributed.multi_grained import multi_grained_loss

__all__ = ["MODES", "contrastive_loss", "multi_grained_loss"]
