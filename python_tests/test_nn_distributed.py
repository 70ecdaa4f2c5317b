"""mgccl_ops.nn.ClipLoss and SigLipLoss at world_size 2 on gloo against open_clip's, rank by rank.

Two spawned processes hold the same global batch and each passes its own shard (fp64) to our
module and to open_clip's, built with the same options; the loss and the gradients of the
local features and of the logit scale (and bias) must agree on every rank.
"""

from __future__ import annotations

import pytest
import rank_cases
import torch
import torch.nn.functional as F

pytest.importorskip("open_clip.loss")
WORLD = 2
LOCAL = 5
TOL = {"rtol": 1e-10, "atol": 1e-12}


def _shard(rank: int, seed: int):
    """This rank's image and text features (leaves that require grad) from one global batch."""
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(WORLD * LOCAL, 6, generator=gen, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(WORLD * LOCAL, 6, generator=gen, dtype=torch.float64), dim=1)
    rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
    return image[rows].clone().requires_grad_(), text[rows].clone().requires_grad_()


def _loss_and_grads(module, rank, seed, extra):
    image, text = _shard(rank, seed)
    params = [torch.tensor(value, dtype=torch.float64, requires_grad=True) for value in extra]
    out = module(image, text, *params, output_dict=True)
    loss = out["contrastive_loss"]
    loss.backward()
    return loss.detach(), [image.grad, text.grad, *(p.grad for p in params)]


def _compare(ours, theirs, what):
    (loss, grads), (their_loss, their_grads) = ours, theirs
    torch.testing.assert_close(loss, their_loss, **TOL, msg=lambda m: f"{what}: loss: {m}")
    for name, a, b in zip(("image", "text", "scale", "bias"), grads, their_grads):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"{what}: grad {name}: {m}")


def _case_clip(rank: int, world: int) -> None:
    from open_clip.loss import ClipLoss as OpenClipLoss

    from mgccl_ops.nn import ClipLoss

    for local_loss in (False, True):
        for gather_with_grad in (False, True):
            options = {
                "local_loss": local_loss,
                "gather_with_grad": gather_with_grad,
                "rank": rank,
                "world_size": WORLD,
            }
            what = f"ClipLoss {options}"
            ours = _loss_and_grads(ClipLoss(**options), rank, 1, [7.5])
            theirs = _loss_and_grads(OpenClipLoss(**options), rank, 1, [7.5])
            _compare(ours, theirs, what)


def _case_siglip(rank: int, world: int) -> None:
    from open_clip.loss import SigLipLoss as OpenSigLipLoss

    from mgccl_ops.nn import SigLipLoss

    for dist_impl in ("bidir", "gather"):
        options = {"rank": rank, "world_size": WORLD, "dist_impl": dist_impl}
        ours = _loss_and_grads(SigLipLoss(**options), rank, 2, [10.0, -4.0])
        theirs = _loss_and_grads(OpenSigLipLoss(**options), rank, 2, [10.0, -4.0])
        _compare(ours, theirs, f"SigLipLoss {options}")


def _case_wrong_rank(rank: int, world: int) -> None:
    from mgccl_ops.nn import ClipLoss

    image, text = _shard(rank, 3)
    with pytest.raises(
        ValueError, match=f"built with rank={1 - rank}, world_size=2 but torch.distributed runs rank {rank} of 2"
    ):
        ClipLoss(rank=1 - rank, world_size=WORLD)(image, text, 5.0)


CASES = {"clip": _case_clip, "siglip": _case_siglip, "wrong_rank": _case_wrong_rank}
CASE_WORLDS = dict.fromkeys(CASES, (WORLD,))


@pytest.mark.parametrize("case", list(CASES))
def test_world_size_two_equals_open_clip(case, tmp_path_factory):
    rank_cases.run_case(__name__, WORLD, case, tmp_path_factory)


def test_world_size_two_needs_torch_distributed():
    from mgccl_ops.nn import ClipLoss, SigLipLoss

    image, text = _shard(0, 4)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        ClipLoss(rank=0, world_size=2)(image, text, 5.0)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        SigLipLoss(rank=0, world_size=2)(image, text, 5.0, -1.0)
