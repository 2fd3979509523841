"""Optimiser (AdamW, or Muon for the blocks' matrices plus AdamW), learning-rate schedule, precision and device."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Optional

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
    if cfg.schedule == "wsd":  # warm-up, stable, then a linear decay over the last decay_fraction of the run
        into_decay = (progress - (1 - cfg.decay_fraction)) / cfg.decay_fraction
        return 1.0 - (1 - cfg.min_lr_ratio) * min(max(into_decay, 0.0), 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2


def muon_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters train.optimizer='muon' gives to Muon: the 2-D weights inside the transformer blocks.

    Only hidden-layer matrices: embeddings, the head, norms, biases, the ACT halting unit and the
    patched body's byte encoder and local decoder stay with AdamW, as Muon's authors prescribe.
    A pipeline stage's missing blocks are None and hold nothing.
    """
    return [p for block in model.body.stack.blocks if block is not None
            for p in block.parameters() if p.ndim == 2 and p.requires_grad]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> "torch.optim.AdamW | MuonAdamW":
    """AdamW with weight decay on the weights of linear layers only (not biases, norms or embeddings).

    With cfg.optimizer == "muon", a MuonAdamW: torch.optim.Muon (lr=cfg.muon_lr) for muon_parameters,
    this AdamW for the others.
    """
    to_muon = {id(p) for p in muon_parameters(model)} if cfg.optimizer == "muon" else set()
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in to_muon]
    groups = [{"params": [p for p in params if id(p) in decayed], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    if cfg.optimizer == "adamw":
        return adamw
    muon = torch.optim.Muon(muon_parameters(model), lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                            weight_decay=cfg.weight_decay)
    return MuonAdamW(adamw, muon)


def set_lr(optimizer: "torch.optim.Optimizer | MuonAdamW", lr: float) -> None:
    """Set the run's current lr (cfg.lr times the schedule) on AdamW's groups, and the same multiple of muon_lr on Muon's.

    The base lrs are the constructors' (`defaults`), which load_state_dict leaves alone, so a resumed
    run follows the same schedule as an uninterrupted one.
    """
    if not isinstance(optimizer, MuonAdamW):
        for group in optimizer.param_groups:
            group["lr"] = lr
        return
    factor = lr / optimizer.adamw.defaults["lr"]
    set_lr(optimizer.adamw, lr)
    set_lr(optimizer.muon, optimizer.muon.defaults["lr"] * factor)


class MuonAdamW:
    """AdamW and Muon stepped together, seen by the engine and the checkpoints as one optimizer.

    param_groups are AdamW's groups then Muon's (the same dicts, so writing a group's lr reaches
    its optimizer); `state` maps each parameter to its state, whichever optimizer holds it; the
    state dicts use torch's layout with parameters numbered across both, in that order. One object
    keeps build_optimizer's call sites (the engine, the strategies' state gathering and loading,
    bitlm.state's parameter naming) unchanged.
    """

    def __init__(self, adamw: torch.optim.AdamW, muon: torch.optim.Optimizer):
        self.adamw, self.muon = adamw, muon
        self.parts = (adamw, muon)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for part in self.parts for g in part.param_groups]

    @property
    def state(self) -> dict[torch.Tensor, dict[str, Any]]:
        return {p: s for part in self.parts for p, s in part.state.items()}

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = closure() if closure is not None else None
        for part in self.parts:
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        state, groups, offset = {}, [], 0
        for part in self.parts:
            own = part.state_dict()
            state.update({index + offset: s for index, s in own["state"].items()})
            groups += [{**g, "params": [index + offset for index in g["params"]]} for g in own["param_groups"]]
            offset += sum(len(g["params"]) for g in part.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = list(state_dict["param_groups"])
        if len(groups) != len(self.param_groups):
            raise ValueError(f"optimizer state: {len(groups)} parameter groups, this AdamW + Muon optimizer has "
                             f"{len(self.param_groups)} (was the checkpoint trained with another train.optimizer?)")
        for part, own_groups in zip(self.parts, self._split(groups)):
            renumber = {index: i for i, index in enumerate(index for g in own_groups for index in g["params"])}
            part.load_state_dict({
                "state": {renumber[k]: v for k, v in state_dict["state"].items() if k in renumber},
                "param_groups": [{**g, "params": [renumber[index] for index in g["params"]]} for g in own_groups]})

    def _split(self, groups: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
        start = 0
        for part in self.parts:
            yield groups[start:start + len(part.param_groups)]
            start += len(part.param_groups)
