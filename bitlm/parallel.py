"""How one rank of a training run holds and steps the model: single process, DDP or FSDP2.

Parallelism is applied from outside the model (torchtitan's rule): `engine.fit` asks its
Strategy to wrap the model before building the optimizer, to clip gradients, and to gather a
full (unsharded, CPU) state for checkpoints; the model code stays single-device. Only
torch.distributed is used here; the Ray pipeline sets up the process group. The pipeline-
parallel strategy lives in bitlm.pipelining.

Optimizer state travels by parameter name (the module path of each parameter in the unwrapped
model), so a checkpoint written by any strategy loads into any other, or into one process.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("single", "ddp", "fsdp", "pipeline")


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


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies of a plain module's state dict (torch.compile unwrapped)."""
    model = getattr(model, "_orig_mod", model)
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


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

    # evaluation: None means engine.evaluate on the model itself (every rank computes the same numbers)
    evaluate = None

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
        _load_plain(model, model_state)
        if optimizer is not None and optimizer_state is not None:
            load_named_optimizer_state(model, optimizer, optimizer_state)


def _load_plain(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    target = getattr(model, "_orig_mod", model)
    missing, unexpected = target.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint weights do not match the model (missing {missing}, unexpected {unexpected})")


class DDPStrategy(Strategy):
    """DistributedDataParallel: every rank holds the whole model; gradients are averaged in backward."""

    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        device = next(model.parameters()).device
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        ddp.config = model.config  # the losses read model.config; DDP does not forward attributes
        return ddp


class FSDPStrategy(Strategy):
    """FSDP2: `fully_shard` on every block, then on the root; bf16 compute with fp32 reduction on GPU.

    Checkpoints are a documented full-state gather (get_model_state_dict / get_optimizer_state_dict
    with full_state_dict and cpu_offload): one safetensors file that loads into a single process.
    """

    name = "fsdp"

    def __init__(self, *, rank: int = 0, world_size: int = 1, mixed_precision: Optional[bool] = None):
        super().__init__(rank=rank, world_size=world_size)
        self.mixed_precision = mixed_precision

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        device = next(model.parameters()).device
        use_mp = self.mixed_precision if self.mixed_precision is not None else device.type == "cuda"
        kwargs = {}
        if use_mp:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.body.stack.blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def full_state(self, model, optimizer):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=options)
        optim_state = get_optimizer_state_dict(model, optimizer, options=options)
        if not self.writes_checkpoints:
            return None
        persistent = model.state_dict().keys()  # read once: non-persistent buffers stay out of checkpoints
        buffers = {n: b.detach().cpu() for n, b in model.named_buffers() if n in persistent}
        return {k: v.contiguous() for k, v in (model_state | buffers).items()}, _plain_groups(optim_state)

    def unwrapped(self, model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # without cpu_offload every rank receives the full tensors (a collective: all ranks call this)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        device = next(iter(full.values())).device if full else torch.device("cpu")
        plain = type(model)(model.config).to(device)
        plain.load_state_dict(full, strict=False)
        plain.reference_marginals.copy_(model.reference_marginals.to(device))
        return plain.train(model.training)

    def load_full_state(self, model, optimizer, model_state, optimizer_state):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_state, options=options)
        if optimizer is not None and optimizer_state is not None:
            set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def _plain_groups(optim_state: dict[str, Any]) -> dict[str, Any]:
    """torch.distributed.checkpoint's named optimizer state in our layout (the same keys, CPU tensors)."""
    state = {name: {k: (v.detach().cpu().contiguous() if torch.is_tensor(v) else v) for k, v in s.items()}
             for name, s in optim_state["state"].items()}
    return {"state": state, "param_groups": [dict(g) for g in optim_state["param_groups"]]}


def make_strategy(name: str, *, rank: int = 0, world_size: int = 1, **options) -> Strategy:
    """The Strategy called `name` (single, ddp, fsdp or pipeline) for this rank."""
    if name == "single" or (name in ("ddp", "fsdp") and world_size == 1):
        # one data-parallel rank has nothing to average or shard: DDP's gradient buckets would be pure cost
        return Strategy(rank=rank, world_size=world_size)
    if name in ("ddp", "fsdp") and not dist.is_initialized() and world_size > 1:
        raise RuntimeError(f"strategy {name!r} with world_size={world_size} needs an initialised process group")
    if name == "ddp":
        return DDPStrategy(rank=rank, world_size=world_size)
    if name == "fsdp":
        return FSDPStrategy(rank=rank, world_size=world_size, **options)
    if name == "pipeline":
        from .pipelining import PipelineStrategy

        return PipelineStrategy(rank=rank, world_size=world_size, **options)
    raise ValueError(f"strategy: unknown {name!r}; choose from {list(STRATEGIES)}")
