"""The training loop: AdamW, warm-up + cosine, autocast, clipping, checkpoints, resume, logs."""

from __future__ import annotations

import json
import random
import resource
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..backends import get_ops
from ..data.collate import collate_pairs
from ..data.rank_sampler import RankStepBatchSampler
from ..data.stream import StreamPosition, collate_stream
from ..data.synthetic import SyntheticShapes, vocabulary_words
from ..models import SmallDualEncoder, build_model
from . import checkpoint, ddp
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

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the model trains with DDP: each rank reads its own
    part of every global batch (``cfg.batch_size`` pairs per rank and micro-step), the
    object and multi-grained losses run across ranks (:mod:`mgccl_ops.distributed`), and
    rank 0 alone writes the checkpoint and the log (which record the world size). With
    ``cfg.accum_steps`` > 1 each optimiser step accumulates that many micro-batches.

    Args:
        cfg: the run's configuration.
        resume: continue from ``out_dir/checkpoint.pt``; the run then ends exactly as an
            uninterrupted one would (same batches, random states, optimiser and schedule).
        model: a model with the interface of ``SmallDualEncoder``; default the small one.
        dataset: map-style items with ``image`` uint8 [3, H, W], ``caption`` and
            ``entities`` (default the built-in training split), or a
            :class:`mgccl_ops.data.stream.PairStream` (streamed; its position per rank and
            worker is checkpointed, and its skipped-sample counts, summed over ranks, logged).
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
    ctx = ddp.start(cfg.device)
    try:
        return _train_on(ctx, cfg, resume, model, dataset, stop_after)
    finally:
        ddp.stop(ctx)


class _BatchLoss(nn.Module):
    """The model and the objective as one module, so DDP sees the whole step as ``forward``."""

    def __init__(self, model: nn.Module, ops, objective):
        super().__init__()
        self.model, self.ops, self.objective = model, ops, objective

    def forward(self, batch: dict):
        return batch_loss(self.model, batch, self.ops, self.objective)


def _seed_rank(seed: int, rank: int) -> None:
    """Distinct global random streams per rank (data augmentation, sampling in the objective)."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def _train_on(
    ctx: ddp.RunContext,
    cfg: TrainConfig,
    resume: bool,
    model: nn.Module | None,
    dataset: torch.utils.data.Dataset | None,
    stop_after: int | None,
) -> nn.Module:
    device = ctx.device
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = out / "checkpoint.pt", out / "log.jsonl"
    state = checkpoint.load(ckpt_path) if resume else None
    if state and state.get("world_size", 1) != ctx.world:
        raise ValueError(
            f"{ckpt_path} was written by a run of world size {state.get('world_size', 1)}; "
            f"resume it with the same number of processes, got {ctx.world}"
        )
    if model is None:
        model = build_model(state["model_spec"]) if state else build_default_model(cfg)
    model.to(device)
    if dataset is None:
        dataset = SyntheticShapes("train", cfg.num_samples, seed=cfg.seed, size=cfg.image_size)
    ops = get_ops(cfg.backend)
    phrases = ddp.GlobalPhraseIds(ctx)
    if ctx.world > 1:
        ops = ddp.DistributedOps(ops, phrases, cfg.distributed_mode)
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
        checkpoint.set_rng_state(state.get("rng_per_rank", [state["rng"]])[ctx.rank])
        start = state["step"]
        if ctx.is_main:
            _trim_log(log_path, start)
    else:
        if ctx.is_main and log_path.exists():
            log_path.unlink()
        if ctx.world > 1:
            _seed_rank(cfg.seed, ctx.rank)

    stop = cfg.steps if stop_after is None else min(stop_after, cfg.steps)
    accum = cfg.accum_steps
    stream = isinstance(dataset, torch.utils.data.IterableDataset)
    position = StreamPosition(state["data"][ctx.rank] if state and state.get("data") else None)
    if stream:
        loader = torch.utils.data.DataLoader(
            dataset.resumed_at(position.workers),
            batch_size=cfg.batch_size,
            collate_fn=collate_stream,
            num_workers=cfg.workers,
        )
    else:
        sampler = RankStepBatchSampler(
            len(dataset), cfg.batch_size, cfg.seed, start, stop, rank=ctx.rank, world=ctx.world, accum_steps=accum
        )
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate_pairs, num_workers=cfg.workers
        )
    step_module = _BatchLoss(model, ops, cfg.objective)
    runner = step_module
    if ctx.world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        runner = DistributedDataParallel(step_module, device_ids=device_ids, find_unused_parameters=True)
    model.train()
    bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and ctx.is_main), desc="train", unit="step")
    tick, seen = time.perf_counter(), 0
    batches = iter(loader)
    board = TensorBoardLog(out / "tensorboard") if cfg.tensorboard and ctx.is_main else None
    with log_path.open("a") if ctx.is_main else nullcontext() as log:
        for step in range(start + 1, stop + 1):
            optimizer.zero_grad(set_to_none=True)
            losses, parts = [], {}
            for micro in range(accum):
                batch = next(batches, None)
                if batch is None:
                    raise RuntimeError(f"the data ran out at step {step}: a finite stream cannot feed {stop} steps")
                position.update(batch.get("stream"))
                if ctx.world > 1:
                    phrases.update(batch["phrases"])
                last = micro == accum - 1
                sync = runner.no_sync() if ctx.world > 1 and not last else nullcontext()
                cast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
                with sync:
                    with cast:
                        loss, micro_parts = runner(batch)
                    scaler.scale(loss if accum == 1 else loss / accum).backward()
                losses.append(loss.detach())
                for name, value in micro_parts.items():
                    parts[name] = parts.get(name, 0.0) + value.detach() / accum
                seen += len(batch["captions"])
            loss = losses[0] if accum == 1 else torch.stack(losses).mean()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % cfg.log_every == 0 or step == stop:
                now = time.perf_counter()
                peaks = ddp.gather_objects(ctx, peak_memory_mib(device))
                skipped = ddp.gather_objects(ctx, position.skipped())
                record = {
                    "step": step,
                    "loss": loss.item(),
                    **{k: v.item() for k, v in parts.items()},
                    "grad_norm": grad_norm.item(),
                    "lr": scheduler.get_last_lr()[0],
                    "logit_scale": model.logit_scale.exp().item(),
                    "images_per_s": seen * ctx.world / max(now - tick, 1e-9),
                    "peak_memory_mib": max(peaks),
                }
                if ctx.world > 1 or accum > 1:
                    record.update(world_size=ctx.world, accum_steps=accum, peak_memory_mib_per_rank=peaks)
                if stream:
                    record["skipped"] = dict(sum((Counter(s) for s in skipped), Counter()))
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if board is not None:
                    board.add(record)
                tick, seen = now, 0
            if step % cfg.checkpoint_every == 0 or step == stop:
                rngs = ddp.gather_objects(ctx, checkpoint.rng_state())
                positions = ddp.gather_objects(ctx, position.workers) if stream else None
                if ctx.is_main:
                    checkpoint.save_atomic(
                        {
                            "step": step,
                            "world_size": ctx.world,
                            "config": cfg.to_dict(),
                            "model_spec": model.describe(),
                            "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "scaler": scaler.state_dict(),
                            "rng": rngs[0],
                            "rng_per_rank": rngs,
                            "data": positions,
                        },
                        ckpt_path,
                    )
    bar.close()
    if board is not None:
        board.close()
    model.eval()
    return model
