"""mgccl_ops: fused kernels for multi-grained cross-modal contrastive learning.

Import torch first: the compiled module ``mgccl_ops._C`` links against it.
"""

import torch  # noqa: F401  (loads libtorch before the compiled module)

from mgccl_ops._extension import build_info
from mgccl_ops.ops import contrastive_loss

__version__ = "0.1.0"

__all__ = ["build_info", "contrastive_loss"]
