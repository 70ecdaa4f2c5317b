"""Plain-PyTorch pairwise-sigmoid (SigLIP) contrastive loss, materialising the N x M logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mgccl_ops.ops._dtypes import accumulation_dtype


def sigmoid_contrastive_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float | torch.Tensor,
    bias: float | torch.Tensor,
) -> torch.Tensor:
    """Reference of :func:`mgccl_ops.sigmoid_contrastive_loss`.

    q [N, D], k [M, D] -> 0-dim loss ``-sum_ij log sigmoid(y_ij z_ij) / N`` with
    ``z_ij = scale * <q_i, k_j> + bias`` and ``y_ij = +1`` where ``i == j``, ``-1`` elsewhere
    (open_clip's ``SigLipLoss`` normalisation); 0 when N == 0. Float32 (float64 for float64
    inputs).
    """
    acc = accumulation_dtype(q.dtype)
    n, m = q.shape[0], k.shape[0]
    logits = scale * (q.to(acc) @ k.to(acc).T) + bias  # [N, M]
    labels = -torch.ones(n, m, dtype=acc, device=q.device)
    labels.diagonal().fill_(1.0)
    total = -F.logsigmoid(labels * logits).sum()
    return total / max(n, 1)
