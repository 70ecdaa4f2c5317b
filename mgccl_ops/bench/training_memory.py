"""Peak memory of one MGCCL training step, fused ops against the plain-PyTorch reference.

The step is a setup factory for the benchmark harness (``mgccl_ops.bench.harness``), which
runs it in a fresh subprocess and reports the growth of the peak resident set (CPU) or of
the allocated CUDA memory during the step. ``scope="step"`` measures the whole training step
(encoders, objective, backward); ``scope="objective"`` starts from encoder outputs that are
leaf tensors, isolating what the ops and their plain-PyTorch twins cost. The step is run
once before it is measured (one-time allocations of a fresh process are not a step's), and
with a trained model, whose pixel level labels pixels as in training.

On the CPU the subprocess runs with ``MALLOC_MMAP_THRESHOLD_=65536`` (:data:`MEASURE_ENV`, set by
:func:`step_peak_memory_mib`): glibc then serves every
block of 64 KiB or more with its own mapping and unmaps it when freed, so memory freed while
building the inputs is not silently reused by the step and the RSS growth counts every
tensor the step allocates.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace

import torch

from ..backends import get_ops
from ..data.collate import collate_pairs
from ..data.synthetic import SyntheticShapes
from ..models import build_model
from ..train import checkpoint
from ..train.config import TrainConfig
from ..train.objective import ObjectiveConfig, mgccl_loss
from ..train.step import batch_loss
from ..train.trainer import build_default_model
from . import harness

FACTORY = "mgccl_ops.bench.training_memory:training_step"
MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def training_step(
    backend: str,
    batch_size: int,
    hard_negatives: int,
    scope: str,
    checkpoint_path: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    checkpoint_activations: bool | None = None,
) -> Callable[[], None]:
    """Setup factory: model, batch and inputs built here; the returned callable runs one
    forward + backward of the full MGCCL objective with the given op backend (already run
    once here, see :func:`_warmed_up`).

    The model is the one saved at ``checkpoint_path`` (a trained one: its pixel level then
    labels the pixels as training does, while an untrained model's pixels mostly fall under
    the confidence bound) or, if None, a fresh default model. It is in training mode, with
    the activation checkpointing it was built with unless ``checkpoint_activations`` says.
    """
    cfg = TrainConfig(seed=seed, objective=ObjectiveConfig(hard_negatives=hard_negatives))
    if checkpoint_path is None:
        model = build_default_model(cfg)
    else:
        state = checkpoint.load(checkpoint_path)
        model = build_model(state["model_spec"])
        model.load_state_dict(state["model"])
        cfg.objective = TrainConfig.from_dict(state["config"]).objective
        cfg.objective = replace(cfg.objective, hard_negatives=hard_negatives)
    if checkpoint_activations is not None:
        model.image_encoder.checkpoint_activations = checkpoint_activations
    model.to(device).train()
    data = SyntheticShapes("train", batch_size, seed=seed)
    batch = collate_pairs([data[i] for i in range(batch_size)])
    ops = get_ops(backend)
    if scope == "step":

        def step() -> None:
            loss, _ = batch_loss(model, batch, ops, cfg.objective)
            loss.backward()

        return _warmed_up(step, list(model.parameters()))
    if scope != "objective":
        raise ValueError(f"scope must be 'step' or 'objective', got {scope!r}")
    images = batch["images"].to(device)
    with torch.no_grad():
        dense, glob, grid = model.encode_image(images)
        text = model.encode_text(batch["captions"] + batch["phrases"])
    leaves = [t.detach().clone().requires_grad_() for t in (dense, glob, text[:batch_size], text[batch_size:])]
    entity_ids = batch["entity_ids"].to(device)
    background = getattr(model, "background_emb", None)

    def objective_step() -> None:
        loss, _ = mgccl_loss(ops, *leaves, entity_ids, model.logit_scale, cfg.objective, background, images, grid)
        loss.backward()

    return _warmed_up(objective_step, [*leaves, *model.parameters()])


def _warmed_up(step: Callable[[], None], tensors: list[torch.Tensor]) -> Callable[[], None]:
    """Run ``step`` once and drop the gradients it left, then return it.

    The first step of a process also allocates what stays for the process's life (oneDNN
    primitive caches, lazily built kernels, autograd bookkeeping); measuring a second step
    counts only what a training step holds at its peak.
    """
    step()
    for tensor in tensors:
        tensor.grad = None
    return step


def compare_peak_memory(
    batch_size: int, hard_negatives: int, checkpoint_path: str | None = None, device: str = "cpu"
) -> dict[str, dict[str, float | None]]:
    """Peak extra MiB of a step per scope and backend, each measured in a fresh process
    (model as in :func:`training_step`).

    Returns ``{scope: {"fused": MiB, "reference": MiB}}`` for scopes ``step`` and
    ``objective`` (None where the step failed in its subprocess).
    """
    out: dict[str, dict[str, float | None]] = {}
    if checkpoint_path is not None:  # the measuring subprocess runs in another directory
        checkpoint_path = os.path.abspath(checkpoint_path)
    for scope in ("step", "objective"):
        out[scope] = {}
        for backend in ("fused", "reference"):
            params = {"backend": backend, "batch_size": batch_size, "hard_negatives": hard_negatives,
                      "scope": scope, "checkpoint_path": checkpoint_path, "device": device}  # fmt: skip
            out[scope][backend] = step_peak_memory_mib(params, device)
    return out


def step_peak_memory_mib(params: dict, device: str = "cpu") -> float | None:
    """Peak extra MiB of one :func:`training_step` built from ``params``, measured in a fresh
    process with :data:`MEASURE_ENV`; None if the step failed there."""
    return harness.peak_memory_mib(FACTORY, params, device, extra_env=MEASURE_ENV)
