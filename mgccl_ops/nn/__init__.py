"""``torch.nn.Module`` drop-ins over the fused ops.

- :class:`ClipLoss` and :class:`SigLipLoss`: open_clip's constructors and calls (same values and
  gradients); change the import and keep the training loop.
- :class:`MultiGrainedLoss`: :func:`mgccl_ops.multi_grained_loss` with its levels and weights as
  module configuration.
- :class:`HardNegativeMiner`: a pytorch-metric-learning style miner built on
  :func:`mgccl_ops.topk_hard_negatives`.
"""

from mgccl_ops.nn.clip import ClipLoss
from mgccl_ops.nn.miner import HardNegativeMiner
from mgccl_ops.nn.multi_grained import MultiGrainedLoss
from mgccl_ops.nn.siglip import SigLipLoss

__all__ = ["ClipLoss", "HardNegativeMiner", "MultiGrainedLoss", "SigLipLoss"]
