"""The training loop: AdamW, warm-up + cosine, autocast, clipping, checkpoints, resume, logs."""

from __future__ import annotations

import json
import resource
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..backends import get_ops
from ..data.collate import StepBatchSampler, collate_pairs
from ..data.synthetic import SyntheticShapes, vocabulary_words
from ..models import SmallDualEncoder, build_model
from . import checkpoint
from .config import TrainConfig
from .schedule import warmup_cosine
from .step import batch_loss
from .tensorboard_log import TensorBoardLog


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for an ``amp`` setting on a device, or None for full precision.

    ``"auto"`` picks bf16 on a CUDA device that supports it and stays in float32 on the
    CPU (CPU autocast is slower than float32 on most CPUs without bf16 matrix units).
    """
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if amp == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    raise ValueError(f"amp must be 'auto', 'off', 'bf16' or 'fp16', got {amp!r}")


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far in MiB: allocated tensors on CUDA, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_default_model(cfg: TrainConfig) -> nn.Module:
    """The small dual encoder over the built-in vocabulary, initialised from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    return SmallDualEncoder(vocabulary_words(), dim=cfg.dim, checkpoint_activations=cfg.checkpoint_activations)


def _trim_log(path: Path, last_step: int) -> None:
    """Drop records past ``last_step`` (written after the checkpoint a resume starts from)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= last_step]
    path.write_text("".join(ln + "\n" for ln in lines))


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    model: nn.Module | None = None,
    dataset: torch.utils.data.Dataset | None = None,
    stop_after: int | None = None,
) -> nn.Module:
    """Train and return the model; writes ``checkpoint.pt`` and ``log.jsonl`` in ``cfg.out_dir``.

    Args:
        cfg: the run's configuration.
        resume: continue from ``out_dir/checkpoint.pt``; the run then ends exactly as an
            uninterrupted one would (same batches, random states, optimiser and schedule).
        model: a model with the interface of ``SmallDualEncoder``; default the small one.
        dataset: map-style items with ``image`` uint8 [3, H, W], ``caption`` and
            ``entities``; default the built-in training split.
        stop_after: leave after this step (its checkpoint written), as an interrupted run
            would; ``resume`` then finishes it.
    """
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    try:
        return _train(cfg, resume, model, dataset, stop_after)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _train(
    cfg: TrainConfig,
    resume: bool,
    model: nn.Module | None,
    dataset: torch.utils.data.Dataset | None,
    stop_after: int | None,
) -> nn.Module:
    device = torch.device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = out / "checkpoint.pt", out / "log.jsonl"
    state = checkpoint.load(ckpt_path) if resume else None
    if model is None:
        model = build_model(state["model_spec"]) if state else build_default_model(cfg)
    model.to(device)
    if dataset is None:
        dataset = SyntheticShapes("train", cfg.num_samples, seed=cfg.seed, size=cfg.image_size)
    ops = get_ops(cfg.backend)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    scheduler = warmup_cosine(optimizer, cfg.warmup, cfg.steps)
    amp_dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start = 0
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        start = state["step"]
        _trim_log(log_path, start)
    elif log_path.exists():
        log_path.unlink()

    stop = cfg.steps if stop_after is None else min(stop_after, cfg.steps)
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, cfg.seed, start, stop)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_pairs, num_workers=cfg.workers
    )
    model.train()
    bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress, desc="train", unit="step")
    tick, seen = time.perf_counter(), 0
    board = TensorBoardLog(out / "tensorboard") if cfg.tensorboard else None
    with log_path.open("a") as log:
        for step, batch in enumerate(loader, start=start + 1):
            cast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
            with cast:
                loss, parts = batch_loss(model, batch, ops, cfg.objective)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            seen += len(batch["captions"])
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % cfg.log_every == 0 or step == stop:
                now = time.perf_counter()
                record = {
                    "step": step,
                    "loss": loss.item(),
                    **{k: v.item() for k, v in parts.items()},
                    "grad_norm": grad_norm.item(),
                    "lr": scheduler.get_last_lr()[0],
                    "logit_scale": model.logit_scale.exp().item(),
                    "images_per_s": seen / max(now - tick, 1e-9),
                    "peak_memory_mib": peak_memory_mib(device),
                }
                log.write(json.dumps(record) + "\n")
                log.flush()
                if board is not None:
                    board.add(record)
                tick, seen = now, 0
            if step % cfg.checkpoint_every == 0 or step == stop:
                checkpoint.save_atomic(
                    {
                        "step": step,
                        "config": cfg.to_dict(),
                        "model_spec": model.describe(),
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "rng": checkpoint.rng_state(),
                    },
                    ckpt_path,
                )
    bar.close()
    if board is not None:
        board.close()
    model.eval()
    return model
