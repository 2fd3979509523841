"""Model and optimizer state in the checkpoint format: CPU tensors, optimizer state keyed by parameter name.

Optimizer state travels by parameter name (the module path of each parameter in the unwrapped
model), so a checkpoint written by any strategy loads into any other, or into one process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name: {"state": {name: {...}}, "param_groups": [...]}."""
    names = {id(p): n for n, p in model.named_parameters()}
    state = {names[id(p)]: dict(s) for p, s in optimizer.state.items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    return {"state": state, "param_groups": groups}


def load_named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, named: dict[str, Any]) -> None:
    """Inverse of named_optimizer_state for the parameters this optimizer holds (others are ignored)."""
    params = dict(model.named_parameters())
    index = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            index[id(p)] = len(index)
    state, groups = {}, []
    for group, saved in zip(optimizer.param_groups, named["param_groups"]):
        held = [n for n in saved["params"] if n in params]
        if [id(params[n]) for n in held] != [id(p) for p in group["params"]]:
            raise ValueError("optimizer checkpoint: parameter groups do not match this model "
                             f"(saved {len(saved['params'])} names, this rank holds {len(group['params'])})")
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": [index[id(params[n])] for n in held]})
        for n in held:
            if n in named["state"]:
                state[index[id(params[n])]] = named["state"][n]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def unwrap(model: nn.Module) -> nn.Module:
    """The module torch.compile wrapped, or `model` itself."""
    return getattr(model, "_orig_mod", model)


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies of a plain module's state dict (torch.compile unwrapped)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in unwrap(model).state_dict().items()}


def cpu_optimizer_state(named: dict[str, Any]) -> dict[str, Any]:
    """A named optimizer state with its tensors detached and on CPU."""
    state = {name: {k: (v.detach().cpu().contiguous() if torch.is_tensor(v) else v) for k, v in s.items()}
             for name, s in named["state"].items()}
    return {"state": state, "param_groups": [dict(g) for g in named["param_groups"]]}


def load_state(model: nn.Module, state: dict[str, torch.Tensor], *, source: Any = "checkpoint") -> None:
    """Copy a full state dict into a plain model; names and shapes must match exactly."""
    missing, unexpected = unwrap(model).load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the model (missing {missing}, unexpected {unexpected})")
