"""Configuration of a training run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..distributed import MODES as DISTRIBUTED_MODES
from .objective import ObjectiveConfig


@dataclass
class TrainConfig:
    """Everything that defines a run; saved in its checkpoints.

    Attributes:
        out_dir: folder for ``checkpoint.pt`` and ``log.jsonl``.
        steps: optimiser steps in all.
        batch_size: image-caption pairs per step (per rank and micro-step under torchrun
            and gradient accumulation).
        accum_steps: micro-batches accumulated into each optimiser step.
        lr, weight_decay: AdamW settings (peak learning rate).
        warmup: linear warm-up steps before the cosine decay.
        grad_clip: maximum global gradient norm (0 = no clipping).
        seed: seeds the model initialisation and the batch order.
        backend: ``"fused"`` (mgccl_ops kernels) or ``"reference"`` (plain PyTorch).
        objective: level weights and knobs.
        num_samples: size of the built-in training split.
        image_size: side of the built-in images.
        dim: embedding width of the small model.
        checkpoint_activations: run the small model's image encoder under activation
            checkpointing (less memory per step for a third more encoder compute).
        amp: ``"auto"`` (bf16 on CUDA when supported, else off), ``"off"``, ``"bf16"``, ``"fp16"``.
        device: torch device string.
        workers: data-loader worker processes.
        checkpoint_every: steps between checkpoints (the last step always writes one).
        log_every: steps between JSON-lines log records.
        progress: show a tqdm bar.
        deterministic: run with ``torch.use_deterministic_algorithms`` (warnings only where
            an op has no deterministic kernel), so that equal runs, and a resumed run and an
            uninterrupted one, give bit-identical weights.
        tensorboard: also write TensorBoard scalars (``out_dir/tensorboard``) beside the
            JSON lines, when the ``tensorboard`` package is importable.
        data: ``synthetic``, ``folder:PATH`` or ``shards:SPEC`` (read by ``mgccl train``).
        concepts: concept vocabulary file for the entity phrases of real captions.
        limit: captions read (no images) for the small model's vocabulary on real data
            (default 20000); the pairs themselves are streamed.
        model: ``small`` or ``open_clip:ARCH``.
        pretrained: open_clip weights file the run started from.
        distributed_mode: how the object-level loss runs across ranks under torchrun:
            ``"gather"`` (all-gather the embeddings) or ``"ring"`` (blocks travel around the
            ring, per-rank memory O(local batch)); the gradients are the same.

    ``data`` to ``pretrained`` and ``image_size`` (:data:`RUN_FIELDS`) say what a run trains
    on and from; ``mgccl train --resume`` restores them from the checkpoint.
    """

    out_dir: str = "runs/mgccl"
    steps: int = 300
    batch_size: int = 32
    accum_steps: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 20
    grad_clip: float = 1.0
    seed: int = 0
    backend: str = "fused"
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    num_samples: int = 20000
    image_size: int = 96
    dim: int = 64
    checkpoint_activations: bool = True
    amp: str = "auto"
    device: str = "cpu"
    workers: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    progress: bool = True
    deterministic: bool = True
    tensorboard: bool = True
    data: str = "synthetic"
    concepts: str | None = None
    limit: int | None = None
    model: str = "small"
    pretrained: str | None = None
    distributed_mode: str = "gather"

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if self.distributed_mode not in DISTRIBUTED_MODES:
            raise ValueError(f"distributed_mode must be one of {DISTRIBUTED_MODES}, got {self.distributed_mode!r}")

    def to_dict(self) -> dict:
        """Plain-data form (for checkpoints and logs)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> TrainConfig:
        """Inverse of :meth:`to_dict`; fields absent from ``data`` take their defaults.

        Raises:
            ValueError: a key that is not a field (naming it and ``source``).
        """
        data = dict(data)
        objective = dict(data.pop("objective", None) or {})
        for keys, known in ((data, fields(cls)), (objective, fields(ObjectiveConfig))):
            unknown = sorted(set(keys) - {f.name for f in known})
            if unknown:
                raise ValueError(f"{source}: unknown training option(s) {unknown}")
        return cls(**data, objective=ObjectiveConfig(**objective))


# The fields that say what a run trains on and from: restored by ``mgccl train --resume``.
RUN_FIELDS = ("data", "concepts", "limit", "model", "pretrained", "image_size")
