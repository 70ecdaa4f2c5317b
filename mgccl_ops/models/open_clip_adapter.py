"""Use any open_clip model (its own tokenizer, dense patch tokens) as a training-layer model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DENSE_MODES = ("tokens", "value_value")


class OpenClipDualEncoder(nn.Module):
    """Wraps an ``open_clip.CLIP`` so it offers the interface of ``SmallDualEncoder``.

    Dense features come from the visual tower's patch tokens mapped into the joint space.
    For a ``VisionTransformer``:

    - ``dense="tokens"`` (for training): the final-norm patch tokens of the ordinary
      forward pass times the output projection.
    - ``dense="value_value"`` (the zero-shot baseline): the last block's attention is
      replaced by value-value attention, ``softmax(v_h v_h^T / sqrt(d_h)) v_h`` per head over
      the last block's values (CLIP Surgery / SCLIP's v-v attention, on MaskCLIP's
      observation that CLIP's last query-key attention is spatially uninformative). Its
      output projection is taken without the block's residual and MLP (as MaskCLIP and
      ClearCLIP do), then the final norm and the output projection. The global embedding
      stays the ordinary forward pass's.

    Images of any size are encoded: the positional embedding is resized bicubically to the
    patch grid (sliding windows larger than the training size). For a ``ModifiedResNet``
    the last feature map goes through the attention pool's value and output projections
    (each position attending only to itself, MaskCLIP's ResNet recipe) in either mode.
    Other towers raise ``TypeError``.

    Args:
        model: an ``open_clip.CLIP`` (or compatible) with ``visual``, ``encode_text`` and
            ``logit_scale``.
        tokenizer: callable texts -> token ids [N, L] (``open_clip.get_tokenizer(name)``).
        name: the architecture name, recorded by :meth:`describe`.
        mean, std: image normalisation of the model, in 0..1 units, per channel.
        dense: ``"tokens"`` or ``"value_value"``, see above.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        name: str = "custom",
        mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
        std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711),
        dense: str = "tokens",
    ):
        super().__init__()
        if dense not in DENSE_MODES:
            raise ValueError(f"dense must be one of {DENSE_MODES}, got {dense!r}")
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
        if self._kind == "vit" and dense == "value_value":
            attn = visual.transformer.resblocks[-1].attn
            if not isinstance(attn, nn.MultiheadAttention):
                raise TypeError(f"value-value attention needs nn.MultiheadAttention blocks, got {type(attn).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.dense = dense
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)

    @property
    def logit_scale(self) -> nn.Parameter:
        """The wrapped model's log logit scale."""
        return self.model.logit_scale

    @property
    def image_size(self) -> int:
        """The side of the images the tower was built for (its positional embedding's)."""
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, tuple | list) else size)

    @classmethod
    def from_name(cls, name: str, pretrained: str | None = None, dense: str = "tokens") -> OpenClipDualEncoder:
        """Build from an open_clip architecture name; weights from the file ``pretrained``
        (loaded by open_clip with ``weights_only=True``), random without it."""
        import open_clip

        model = open_clip.create_model(name, pretrained=pretrained)
        cfg = model.visual.preprocess_cfg if hasattr(model.visual, "preprocess_cfg") else {}
        kwargs = {k: cfg[k] for k in ("mean", "std") if k in cfg}
        return cls(model, open_clip.get_tokenizer(name), name, dense=dense, **kwargs)

    def describe(self) -> dict:
        """Constructor arguments for :func:`mgccl_ops.models.build_model`."""
        return {"kind": "open_clip", "name": self.name, "dense": self.dense}

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Images [B, 3, H, W] (0..255; any size for a ViT, whose positional embedding is
        resized to the patch grid).

        Returns dense [B, P, D], global [B, D] (both unit norm) and the patch grid (h, w).
        """
        x = (images.to(self.mean.dtype) - self.mean) / self.std
        visual = self.model.visual
        if self._kind == "vit":
            dense, pooled, (h, w) = self._vit(visual, x)
        else:
            fmap = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(x)))))
            pooled = visual.attnpool(fmap)
            pool = visual.attnpool
            h, w = fmap.shape[-2:]
            dense = pool.c_proj(pool.v_proj(fmap.flatten(2).transpose(1, 2)))
        return F.normalize(dense, dim=-1), F.normalize(pooled, dim=-1), (h, w)

    def _vit(self, visual: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """open_clip's ``VisionTransformer.forward`` with a resized positional embedding;
        returns the dense tokens in the joint space, the pooled embedding and the grid."""
        tokens = visual.conv1(x)
        b, width, h, w = tokens.shape
        tokens = tokens.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(tokens.dtype).view(1, 1, width).expand(b, 1, width)
        x = torch.cat([cls, tokens], 1) + _resized_positions(visual, h, w).to(tokens.dtype)
        x = visual.ln_pre(visual.patch_dropout(x))
        blocks = visual.transformer.resblocks
        batch_first = getattr(visual.transformer, "batch_first", True)
        x = x if batch_first else x.transpose(0, 1)
        for block in blocks[:-1]:
            x = block(x)
        last = blocks[-1](x)
        if not batch_first:
            x, last = x.transpose(0, 1), last.transpose(0, 1)
        pooled, tokens = visual._pool(last)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        if self.dense == "value_value":
            tokens = visual.ln_post(_value_value_attention(blocks[-1], x)[:, 1:])
        dense = tokens @ visual.proj if visual.proj is not None else tokens
        return dense, pooled, (h, w)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm embeddings [N, D] of N texts through the model's tokenizer and text tower."""
        tokens = self.tokenizer(list(texts)).to(self.logit_scale.device)
        return F.normalize(self.model.encode_text(tokens), dim=-1)


def _resized_positions(visual: nn.Module, h: int, w: int) -> torch.Tensor:
    """The tower's positional embedding [1 + h*w, W] for an h x w patch grid (bicubic)."""
    pos = visual.positional_embedding
    gh, gw = visual.grid_size
    if (h, w) == (gh, gw):
        return pos
    grid = pos[1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], grid[0].flatten(1).T.to(pos.dtype)])


def _value_value_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's attention output [B, L, W] with value-value attention: per head
    ``softmax(v v^T / sqrt(d)) v`` on the values of ``ln_1(x)`` [B, L, W], through the output
    projection (and layer scale); no residual, no MLP."""
    attn: nn.MultiheadAttention = block.attn
    y = block.ln_1(x)
    width, heads = y.shape[-1], attn.num_heads
    weight, bias = attn.in_proj_weight[2 * width :], attn.in_proj_bias
    v = F.linear(y, weight, bias[2 * width :] if bias is not None else None)
    b, n, _ = v.shape
    v = v.view(b, n, heads, width // heads).transpose(1, 2)  # [B, heads, L, d]
    out = F.scaled_dot_product_attention(v, v, v).transpose(1, 2).reshape(b, n, width)
    return block.ls_1(attn.out_proj(out))
