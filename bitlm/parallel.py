"""How one rank of a training run holds the model: DDP or FSDP2, and `parallelize`, which applies them.

Parallelism is applied from outside the model (torchtitan's rule), in a fixed order: activation
checkpointing on each block, then torch.compile of each block, then the strategy's wrap (DDP,
FSDP2, or the pipeline split of bitlm.pipelining); the model code stays single-device. Only
torch.distributed is used here; the Ray pipeline sets up the process group. The strategy
contract (bitlm.strategy) and the checkpoint state format (bitlm.state) live below this module.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from .pipelining import PipelineStrategy
from .state import cpu_optimizer_state, cpu_state, load_named_optimizer_state, named_optimizer_state  # noqa: F401
from .strategy import STRATEGIES, Strategy, StrategyName  # noqa: F401  (re-exported: the strategy contract)


def _checkpointed_forward(forward, x: torch.Tensor, *, causal: bool) -> torch.Tensor:
    if torch.is_grad_enabled():
        return checkpoint(forward, x, causal=causal, use_reentrant=False)
    return forward(x, causal=causal)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block's activations in backward instead of keeping them (in place; names unchanged).

    Only the plain block forward is checkpointed: decoding with a cache, attention maps and the
    reversible stack (which keeps no activations anyway) call the blocks' parts directly.
    """
    for block in model.body.stack.blocks:
        if block is not None and not getattr(block, "activation_checkpointing", False):
            block.forward = functools.partial(_checkpointed_forward, block.forward)
            block.activation_checkpointing = True
    return model


def compile_blocks(model: nn.Module) -> nn.Module:
    """torch.compile every block in place (Module.compile keeps parameter names, so checkpoints stay portable)."""
    for block in model.body.stack.blocks:
        if block is not None:
            block.compile()
    return model


def parallelize(model: nn.Module, strategy: Strategy, *, activation_checkpointing: bool = False,
                compile: bool = False) -> nn.Module:
    """Apply checkpointing, compile and the strategy's wrap to `model` (on its device), in that order.

    Returns the module to run forward on (the DDP wrapper, or the model itself).
    """
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        compile_blocks(model)
    return strategy.wrap(model)


class DDPStrategy(Strategy):
    """DistributedDataParallel: every rank holds the whole model; gradients are averaged in backward."""

    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        device = next(model.parameters()).device
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


class FSDPStrategy(Strategy):
    """FSDP2: `fully_shard` on every block, then on the root; bf16 compute with fp32 reduction on GPU.

    Checkpoints are a documented full-state gather (get_model_state_dict / get_optimizer_state_dict
    with full_state_dict and cpu_offload): one safetensors file that loads into a single process.
    """

    name = "fsdp"

    def __init__(self, *, rank: int = 0, world_size: int = 1, mixed_precision: Optional[bool] = None):
        super().__init__(rank=rank, world_size=world_size)
        self.mixed_precision = mixed_precision

    def check(self, model: nn.Module, cfg, diffusion=None) -> None:
        if cfg.optimizer == "muon":  # ExperimentConfig refuses the pair too; this covers strategies built in code
            raise ValueError("train.optimizer: 'muon' is not supported by the fsdp strategy: FSDP2 shards every "
                             "weight matrix across ranks and Muon orthogonalises whole matrices; use 'adamw', or "
                             "parallel.strategy 'ddp' or 'pipeline'")

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
        return {k: v.contiguous() for k, v in (model_state | buffers).items()}, cpu_optimizer_state(optim_state)

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


def strategy_for(parallel, *, rank: int = 0, world_size: int = 1) -> Strategy:
    """The Strategy a config's `parallel` section (a ParallelConfig) asks for, on this rank."""
    options = {}
    if parallel.strategy == "pipeline":
        options = {"n_microbatches": parallel.n_microbatches, "schedule": parallel.pipeline_schedule}
    return make_strategy(parallel.strategy, rank=rank, world_size=world_size, **options)


def make_strategy(name: str, *, rank: int = 0, world_size: int = 1, **options) -> Strategy:
    """The Strategy called `name` (single, ddp, fsdp or pipeline) for this rank."""
    if name == "single" and world_size > 1:
        raise ValueError(f"parallel.strategy: 'single' trains in one process, not {world_size}; "
                         "choose ddp, fsdp or pipeline")
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
        return PipelineStrategy(rank=rank, world_size=world_size, **options)
    raise ValueError(f"parallel.strategy: unknown {name!r}; choose from {list(STRATEGIES)}")
