"""Optimiser, learning-rate schedule, precision and device of a training run."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Optional

import torch

from .config import TrainConfig


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
