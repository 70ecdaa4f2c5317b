"""mgccl_ops: fused kernels for multi-grained cross-modal contrastive learning.

Import torch first: the compiled module ``mgccl_ops._C`` links against it.
"""

import torch  # noqa: F401  (loads libtorch before the compiled module)

from mgccl_ops._extension import build_info
from mgccl_ops.ops import autocast, devices
from mgccl_ops.ops.contrastive import contrastive_loss
from mgccl_ops.ops.hard_negatives import hard_negative_loss, topk_hard_negatives
from mgccl_ops.ops.multi_grained import multi_grained_loss
from mgccl_ops.ops.region_merge import region_auto_threshold, region_merge
from mgccl_ops.ops.region_pool import region_broadcast, region_pool
from mgccl_ops.ops.semantic_unit import adaptive_semantic_unit
from mgccl_ops.ops.sigmoid_contrastive import sigmoid_contrastive_loss
from mgccl_ops.triton import register as _register_triton_kernels

_register_triton_kernels()  # Triton kernels for CUDA (and CPU under MGCCL_TRITON_ON_CPU=1)

# Last: the autocast rule and the unsupported-device error of every mgccl:: operator defined by now.
autocast.register()
devices.register()

__version__ = "0.1.0"

__all__ = [
    "build_info",
    "adaptive_semantic_unit",
    "contrastive_loss",
    "hard_negative_loss",
    "multi_grained_loss",
    "region_auto_threshold",
    "region_broadcast",
    "region_merge",
    "region_pool",
    "sigmoid_contrastive_loss",
    "topk_hard_negatives",
]
