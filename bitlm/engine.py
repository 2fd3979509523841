"""Single-process training loop: AdamW, LR schedule, accumulation, clipping, AMP, eval in bpb, resume."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from . import checkpoint as ckpt
from .config import DiffusionConfig, TrainConfig, to_dict
from .diffusion import diffusion_loss, evaluate_elbo
from .objective import (COMPRESSED_STREAM, LossOutput, causal_loss, compressed_rows, evaluate_bpb, model_inputs,
                        stream_loss, telemetry_penalty)
from .telemetry import detect_metric_drift

Report = Callable[[dict[str, float], Optional[Path]], None]
"""Called with (metrics, checkpoint directory or None) at every log, eval and checkpoint event."""

TELEMETRY_KEYS = ("val/K", "val/C", "val/S")


class MetricDriftWarning(UserWarning):
    """A validation telemetry metric moved by more than train.drift_threshold between windows."""


@dataclass
class FitResult:
    step: int
    train_seconds: float
    metrics: dict[str, float]  # the last evaluation
    history: list[dict[str, float]] = field(default_factory=list)  # every evaluation, in order
    checkpoint: Optional[Path] = None


def compress_probability(cfg: TrainConfig, step: int) -> float:
    """cfg.compress_prob after the warm-up and linear ramp: 0 before compress_warmup_steps."""
    if cfg.compress_prob == 0 or step < cfg.compress_warmup_steps:
        return 0.0
    if cfg.compress_ramp_steps == 0:
        return cfg.compress_prob
    return cfg.compress_prob * min(1.0, (step - cfg.compress_warmup_steps + 1) / cfg.compress_ramp_steps)


def resolve_device(device: Optional[str | torch.device] = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_factory(precision: str, device: torch.device) -> Callable[[], Any]:
    """A zero-argument factory of the autocast context for `precision` on `device`."""
    use_bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def lr_factor(cfg: TrainConfig, step: int, train_seconds: float) -> float:
    """Multiplier of cfg.lr at `step`; progress follows time instead of steps when a time budget is set."""
    progress = step / cfg.max_steps
    if cfg.max_seconds is not None:
        progress = max(progress, train_seconds / cfg.max_seconds)
    progress = min(progress, 1.0)
    if cfg.schedule == "onecycle":
        # cosine ramp from lr/25 to lr over the warm-up fraction, then cosine down to lr/1e4
        warm = min(max(cfg.warmup_steps / cfg.max_steps, 1e-3), 0.5)
        if progress < warm:
            return 0.04 + 0.96 * (1 - math.cos(math.pi * progress / warm)) / 2
        t = (progress - warm) / (1 - warm)
        return 1e-4 + (1 - 1e-4) * (1 + math.cos(math.pi * t)) / 2
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the weights of linear layers only (not biases, norms or embeddings)."""
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) in decayed], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


@torch.no_grad()
def telemetry_means(model, byte_batch: torch.Tensor) -> dict[str, float]:
    """Mean K, C, S of the model on one byte batch."""
    was_training = model.training
    model.eval()
    try:
        ids = model_inputs(model, byte_batch.to(next(model.parameters()).device))
        _, tel = model(ids, return_telemetry=True)
    finally:
        model.train(was_training)
    return {"K": float(tel["negentropy"].mean()), "C": float(tel["lz_complexity"].mean()),
            "S": float(tel["symbiosis"].mean())}


def fit(model, corpus, cfg: TrainConfig, *, diffusion: Optional[DiffusionConfig] = None,
        report: Optional[Report] = None, checkpoint_dir: Optional[str | Path] = None, resume: bool = True,
        device: Optional[str | torch.device] = None, rank: int = 0, world_size: int = 1,
        progress: bool = False) -> FitResult:
    """Train `model` on `corpus` (a bitlm.data.Corpus) following `cfg`.

    A causal model learns next-bit prediction; a non-causal one learns masked diffusion per
    `diffusion` (its loss is the ELBO, evaluated as val/elbo_bpb, an upper bound on bpb).

    With `checkpoint_dir`, rank 0 writes step-NNNNNNNN/ checkpoints there and, when `resume`,
    training continues from the newest one: same data order, optimizer and RNG state, so the
    loss curve is the one an uninterrupted run would have produced.
    """
    device = resolve_device(device)
    base = model.to(device)
    ids = cfg.context_bytes * base.config.ids_per_byte
    if ids > base.config.max_input_ids:
        raise ValueError(f"train.context_bytes={cfg.context_bytes} needs {ids} input ids but the model takes "
                         f"{base.config.max_input_ids} (model.max_seq_len={base.config.max_seq_len})")
    # S compares bits with the corpus for either representation (the byte model's bytes as bits)
    base.set_reference_marginals(corpus.phase_marginals(base.config.parity))
    torch.manual_seed(cfg.seed)
    optimizer = build_optimizer(base, cfg)
    autocast = autocast_factory(cfg.precision, device)
    net = torch.compile(base) if cfg.compile else base

    step, train_seconds, history = 0, 0.0, []
    latest = ckpt.latest_checkpoint(checkpoint_dir) if (checkpoint_dir and resume) else None
    if latest is not None:
        state = ckpt.load_checkpoint(latest, base, optimizer)
        step, train_seconds, history = state["step"], state["train_seconds"], state["history"]

    diffusion = diffusion or DiffusionConfig()

    if cfg.compress_prob > 0 and (base.config.n_streams < 2 or not base.config.causal):
        raise ValueError("train.compress_prob > 0 needs a causal model with model.n_streams >= 2 "
                         f"(got n_streams={base.config.n_streams}, causal={base.config.causal})")

    def objective(batch, micro_index: int, progress: float) -> tuple[LossOutput, dict[str, float]]:
        if not base.config.causal:
            # one generator per micro-batch, seeded by its index, keeps resumed runs exact
            noise = torch.Generator().manual_seed(cfg.seed * 1_000_003 + micro_index)
            return diffusion_loss(net, batch, schedule=diffusion.noise_schedule, generator=noise,
                                  progress=progress, curriculum=diffusion.curriculum), {}
        p = compress_probability(cfg, micro_index // cfg.grad_accum_steps)
        if p == 0:
            return causal_loss(net, batch), {}
        picked = np.random.default_rng([cfg.seed, micro_index, 7]).random(batch.shape[0]) < p
        if not picked.any():
            return causal_loss(net, batch), {"compressed_fraction": 0.0}
        ids, mask, ratio = compressed_rows(batch[torch.from_numpy(picked)], base.config.parity)
        compressed = stream_loss(net, ids, mask, COMPRESSED_STREAM)
        stats = {"compressed_fraction": float(picked.mean()), "compression_ratio": ratio}
        if picked.all():
            zero = compressed.new_zeros(())
            return LossOutput(loss=compressed, nll_bits=zero.detach(), n_bytes=0), stats
        text = causal_loss(net, batch[torch.from_numpy(~picked)])
        mixed = (text.loss * (~picked).sum() + compressed * picked.sum()) / batch.shape[0]
        return dataclasses.replace(text, loss=mixed), stats

    batches = corpus.train.random_batches(cfg.batch_size, cfg.context_bytes, seed=cfg.seed,
                                          start_step=step * cfg.grad_accum_steps, rank=rank,
                                          world_size=world_size)
    bytes_per_step = cfg.batch_size * cfg.context_bytes * cfg.grad_accum_steps
    emit = report or (lambda metrics, path: None)
    bar = _progress_bar(progress, cfg, step)
    window_loss, window_bits, window_bytes, window_time, window_steps = 0.0, 0.0, 0, 0.0, 0
    window_stats: dict[str, float] = {}  # per-step means of objective statistics (compression)
    last_checkpoint = latest
    metrics: dict[str, float] = history[-1] if history else {}

    base.train()
    while step < cfg.max_steps and (cfg.max_seconds is None or train_seconds < cfg.max_seconds):
        t0 = time.perf_counter()
        lr = cfg.lr * lr_factor(cfg, step, train_seconds)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(cfg.grad_accum_steps):
            with autocast():
                out, stats = objective(next(batches), step * cfg.grad_accum_steps + micro, step / cfg.max_steps)
                penalty = telemetry_penalty(out, base.reference_marginals, base.config.bits_per_byte,
                                            lambda_k=cfg.lambda_k, lambda_c=cfg.lambda_c, lambda_s=cfg.lambda_s)
            ((out.loss if penalty is None else out.loss + penalty) / cfg.grad_accum_steps).backward()
            window_loss += float(out.loss.detach()) / cfg.grad_accum_steps
            window_bits += float(out.nll_bits)
            window_bytes += out.n_bytes
            for key, value in stats.items():
                window_stats[key] = window_stats.get(key, 0.0) + value / cfg.grad_accum_steps
        grad_norm = torch.nn.utils.clip_grad_norm_(base.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        step += 1
        train_seconds += dt
        window_time += dt
        window_steps += 1
        if bar is not None:
            bar.update(1)

        final = step >= cfg.max_steps or (cfg.max_seconds is not None and train_seconds >= cfg.max_seconds)
        if step % cfg.log_every == 0 or final:
            bytes_per_s = window_steps * bytes_per_step / window_time
            emit({"step": step, "train_seconds": train_seconds, "lr": lr,
                  "train/loss": window_loss / window_steps, "train/bpb": window_bits / max(window_bytes, 1),
                  "bytes_per_s": bytes_per_s, "bits_per_s": bytes_per_s * base.config.bits_per_byte,
                  "grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
                  "bytes_seen": step * bytes_per_step * world_size}
                 | {f"train/{k}": v / window_steps for k, v in window_stats.items()}, None)
            if bar is not None:
                bar.set_postfix(loss=f"{window_loss / window_steps:.4f}", bpb=f"{window_bits / max(window_bytes, 1):.3f}")
            window_loss, window_bits, window_bytes, window_time, window_steps = 0.0, 0.0, 0, 0.0, 0
            window_stats = {}
        if step % cfg.eval_every == 0 or final:
            metrics = evaluate(base, corpus, cfg, autocast, diffusion) | {"step": step, "train_seconds": train_seconds}
            history.append(metrics)
            metrics |= _drift(history, cfg)
            emit(metrics, None)
        if checkpoint_dir is not None and rank == 0 and (
                final or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
            last_checkpoint = ckpt.save_checkpoint(
                ckpt.step_directory(checkpoint_dir, step), base, optimizer,
                {"step": step, "train_seconds": train_seconds, "history": history, "train": to_dict(cfg)})
            ckpt.prune_checkpoints(checkpoint_dir, cfg.keep_checkpoints)
            emit({"step": step}, last_checkpoint)
    if bar is not None:
        bar.close()
    return FitResult(step=step, train_seconds=train_seconds, metrics=metrics, history=history,
                     checkpoint=last_checkpoint)


def evaluate(model, corpus, cfg: TrainConfig, autocast=None, diffusion: Optional[DiffusionConfig] = None
             ) -> dict[str, float]:
    """Validation bpb (causal) or ELBO bpb (diffusion) over cfg.eval_batches batches, plus K/C/S."""
    val = corpus.val if corpus.val.n_windows else corpus.train
    batches = list(val.sequential_batches(cfg.batch_size, cfg.context_bytes, max_batches=cfg.eval_batches))
    if model.config.causal:
        result = evaluate_bpb(model, batches, autocast=autocast)
        scores = {"val/bpb": result["bpb"], "val/n_bytes": result["n_bytes"]}
    else:
        schedule = (diffusion or DiffusionConfig()).noise_schedule
        result = evaluate_elbo(model, batches, schedule=schedule, seed=cfg.seed)
        scores = {"val/elbo_bpb": result["elbo_bpb"], "val/n_bytes": result["n_bytes"]}
    tel = telemetry_means(model, batches[0])
    return scores | {"val/K": tel["K"], "val/C": tel["C"], "val/S": tel["S"]}


def _drift(history: list[dict[str, float]], cfg: TrainConfig) -> dict[str, float]:
    """Warn (MetricDriftWarning, naming the metric) when val K/C/S drift; returns drift/<metric> deltas."""
    series = [{k: h[k] for k in TELEMETRY_KEYS if k in h} for h in history]
    drifted = detect_metric_drift(series, window=cfg.drift_window, threshold=cfg.drift_threshold)
    for name, delta in drifted.items():
        warnings.warn(f"{name} drifted by {delta:+.3f} (mean of the last {cfg.drift_window} evaluations vs "
                      f"the {cfg.drift_window} before; threshold {cfg.drift_threshold})", MetricDriftWarning,
                      stacklevel=3)
    return {f"drift/{name}": delta for name, delta in drifted.items()}


def _progress_bar(enabled: bool, cfg: TrainConfig, start: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, initial=start, unit="step", dynamic_ncols=True)
