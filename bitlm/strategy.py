"""The contract between engine.fit and a parallel strategy, and the single-process strategy itself.

A strategy says how one rank holds and steps the model (torchtitan's rule: parallelism is applied
from outside the model): it wraps the model, clips gradients, runs or relays the forward of an
evaluation, and gathers a full (unsharded, CPU) state for checkpoints. bitlm.parallel (DDP, FSDP)
and bitlm.pipelining (pipeline stages) both build on it.
"""

from __future__ import annotations

from typing import Any, Optional, get_args

import torch
from torch import nn

from .config import StrategyName
from .state import cpu_state, load_named_optimizer_state, load_state, named_optimizer_state

STRATEGIES: tuple[str, ...] = get_args(StrategyName)


class Strategy:
    """Single-process training; the base of every distributed strategy."""

    name = "single"
    owns_backward = False  # True when forward_backward runs the step (pipeline schedules do)

    def __init__(self, *, rank: int = 0, world_size: int = 1):
        self.rank = rank
        self.world_size = world_size

    @property
    def writes_checkpoints(self) -> bool:
        return self.rank == 0

    @property
    def n_replicas(self) -> int:
        """Data-parallel ranks: each draws its own rows of the global batch (a pipeline shares one batch)."""
        return 1 if self.owns_backward else self.world_size

    def check(self, model: nn.Module, cfg, diffusion=None) -> None:
        """Raise ValueError naming the field when the run asks for something this strategy cannot do."""

    def wrap(self, model: nn.Module) -> nn.Module:
        """Prepare `model` (already on its device) for training; returns the module to run forward on."""
        return model

    def forward_backward(self, batch: torch.Tensor, scale: float):
        """Forward and backward of one micro-batch, for strategies with owns_backward; returns a LossOutput."""
        raise NotImplementedError(f"strategy {self.name!r} lets the engine run forward and backward")

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """Clip the gradients of every parameter of the run to a global norm; returns the norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))

    def unwrapped(self, model: nn.Module) -> nn.Module:
        """A plain single-device model with the run's full current weights, on every rank (for growth)."""
        return model

    def eval_logits(self, model: nn.Module, ids: torch.Tensor) -> Optional[torch.Tensor]:
        """Causal logits of `ids` for an evaluation, on the ranks that have them (None elsewhere)."""
        return model(ids, causal=True)[0]

    def share(self, result: Any) -> Any:
        """The result of the ranks that computed one, on every rank (a collective where ranks differ)."""
        return result

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer
                   ) -> Optional[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """(model state, named optimizer state) on CPU for the checkpoint writer, None on other ranks.

        Every rank must call it: distributed strategies gather inside.
        """
        if not self.writes_checkpoints:
            return None
        return cpu_state(model), named_optimizer_state(model, optimizer)

    def load_full_state(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                        model_state: dict[str, torch.Tensor], optimizer_state: Optional[dict[str, Any]]) -> None:
        """Load a full checkpoint state into this rank's (possibly wrapped or sharded) model and optimizer."""
        load_state(model, model_state)
        if optimizer is not None and optimizer_state is not None:
            load_named_optimizer_state(model, optimizer, optimizer_state)
