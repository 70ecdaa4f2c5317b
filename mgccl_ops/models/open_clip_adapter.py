"""Use any open_clip model (its own tokenizer, dense patch tokens) as a training-layer model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class OpenClipDualEncoder(nn.Module):
    """Wraps an ``open_clip.CLIP`` so it offers the interface of ``SmallDualEncoder``.

    Dense features come from the visual tower's patch tokens mapped into the joint space:
    for a ``VisionTransformer`` the final-norm patch tokens times the output projection; for
    a ``ModifiedResNet`` the last feature map through the attention pool's value and output
    projections (each position attending only to itself). Other towers raise ``TypeError``.

    Args:
        model: an ``open_clip.CLIP`` (or compatible) with ``visual``, ``encode_text`` and
            ``logit_scale``.
        tokenizer: callable texts -> token ids [N, L] (``open_clip.get_tokenizer(name)``).
        name: the architecture name, recorded by :meth:`describe`.
        mean, std: image normalisation of the model, in 0..1 units, per channel.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        name: str = "custom",
        mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
        std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711),
    ):
        super().__init__()
        import open_clip.modified_resnet as mr
        import open_clip.transformer as tr

        visual = model.visual
        if isinstance(visual, tr.VisionTransformer):
            if visual.attn_pool is not None:
                raise TypeError("OpenClipDualEncoder: attention-pooled ViT towers are not supported")
            self._kind = "vit"
        elif isinstance(visual, mr.ModifiedResNet):
            self._kind = "resnet"
        else:
            raise TypeError(
                f"OpenClipDualEncoder supports VisionTransformer and ModifiedResNet towers, got {type(visual).__name__}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)

    @property
    def logit_scale(self) -> nn.Parameter:
        """The wrapped model's log logit scale."""
        return self.model.logit_scale

    @classmethod
    def from_name(cls, name: str, pretrained: str | None = None) -> OpenClipDualEncoder:
        """Build from an open_clip architecture name (weights only if ``pretrained`` names them)."""
        import open_clip

        model = open_clip.create_model(name, pretrained=pretrained)
        cfg = model.visual.preprocess_cfg if hasattr(model.visual, "preprocess_cfg") else {}
        kwargs = {k: cfg[k] for k in ("mean", "std") if k in cfg}
        return cls(model, open_clip.get_tokenizer(name), name, **kwargs)

    def describe(self) -> dict:
        """Constructor arguments for :func:`mgccl_ops.models.build_model`."""
        return {"kind": "open_clip", "name": self.name}

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Images [B, 3, H, W] (0..255, resized by the caller to the model's input size).

        Returns dense [B, P, D], global [B, D] (both unit norm) and the patch grid (h, w).
        """
        x = (images.to(self.mean.dtype) - self.mean) / self.std
        visual = self.model.visual
        if self._kind == "vit":
            keep = visual.output_tokens
            visual.output_tokens = True  # only for this call: the wrapped model stays as it was
            try:
                pooled, tokens = visual(x)
            finally:
                visual.output_tokens = keep
            dense = tokens @ visual.proj if visual.proj is not None else tokens
            h = x.shape[-2] // visual.patch_size[0]
            w = x.shape[-1] // visual.patch_size[1]
        else:
            fmap = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(x)))))
            pooled = visual.attnpool(fmap)
            pool = visual.attnpool
            h, w = fmap.shape[-2:]
            dense = pool.c_proj(pool.v_proj(fmap.flatten(2).transpose(1, 2)))
        return F.normalize(dense, dim=-1), F.normalize(pooled, dim=-1), (h, w)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm embeddings [N, D] of N texts through the model's tokenizer and text tower."""
        tokens = self.tokenizer(list(texts)).to(self.logit_scale.device)
        return F.normalize(self.model.encode_text(tokens), dim=-1)
