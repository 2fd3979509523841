"""Pipeline-parallel training of a BitTransformerLM: each rank runs one contiguous slice of the blocks.

A stage is the model itself with the modules another rank runs set to None (torchtitan's rule):
stage r keeps blocks [lo_r, hi_r) of `model.body.stack.blocks` (balanced, contiguous; the others
become None, so ModuleList indices, and therefore parameter names, stay those of the full model),
the first stage also the input embedding (flat) or byte encoder + BOS (patched) and the input
convolution over them (model.input_conv), the last the output norm and head (flat) or norm,
to_local and the tree decoder (patched). `model.parameters()` is then exactly this rank's share
and `model.state_dict()` a subset of the full model's; the model's own forward skips what is None.

This module holds only the split, the schedule (torch.distributed.pipelining's GPipe or 1F1B over
n_microbatches) with its relay of evaluation forwards, and the gather of the full state; the loss
is bitlm.objective.causal_loss and evaluation bitlm.engine's. Only torch.distributed is used:
gloo on CPU, NCCL on CUDA (the model's device).
"""

from __future__ import annotations

from typing import Any, Optional, get_args

import torch
import torch.distributed as dist
from torch import nn

from .config import PipelineSchedule
from .objective import LossOutput, causal_loss, model_inputs
from .state import cpu_optimizer_state, cpu_state, load_named_optimizer_state, named_optimizer_state, unwrap
from .strategy import Strategy

PIPELINE_SCHEDULES: tuple[str, ...] = get_args(PipelineSchedule)


def stage_layers(n_layers: int, world_size: int, rank: int) -> range:
    """The blocks stage `rank` runs: contiguous, sizes differing by at most one (earlier stages larger)."""
    base, extra = divmod(n_layers, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


# the patched body's modules before the stack (the first stage keeps them) and after it (the last stage)
_PATCHED_INPUTS = ("byte_bits", "byte_mlp", "byte_table", "bos", "input_conv")
_PATCHED_OUTPUTS = ("norm", "to_local", "node_vectors", "node_bias", "shared_vectors", "shared_bias",
                    "pattern_vectors", "pattern_bias")


def prune_to_stage(model: nn.Module, layers: range, *, is_first: bool, is_last: bool) -> None:
    """Set to None, in place, the modules of `model` another stage runs."""
    body = model.body
    blocks = body.stack.blocks
    for i in range(len(blocks)):
        if i not in layers:
            blocks[i] = None
    patched = model.config.arch == "patched"
    if not is_first:
        for name in _PATCHED_INPUTS if patched else ("embed", "phase", "input_conv"):
            setattr(body, name, None)
    if not is_last:
        for name in _PATCHED_OUTPUTS if patched else ("norm", "head"):
            setattr(body, name, None)


class _StageForward(nn.Module):
    """The pruned model as the schedule's stage module: one tensor in, one out (the telemetry dict dropped).

    The last stage hands its loss the head's output (flat: logits; patched: per-byte features,
    read out with the bits that travel as the loss target, so no extra tensor goes down the pipe).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, causal=True, readout=False)[0]


class PipelineStrategy(Strategy):
    """Pipeline parallelism over world_size ranks, one stage per rank, GPipe or 1F1B micro-batching.

    Every rank must pass the same batch to forward_backward. On CUDA, call torch.cuda.set_device
    on each rank first: the object collectives (share, full_state) use the current device.
    """

    name = "pipeline"
    owns_backward = True

    def __init__(self, *, rank: int = 0, world_size: int = 1, n_microbatches: int = 4, schedule: str = "gpipe"):
        super().__init__(rank=rank, world_size=world_size)
        if schedule not in PIPELINE_SCHEDULES:
            raise ValueError(f"parallel.pipeline_schedule: must be one of {list(PIPELINE_SCHEDULES)}, got {schedule!r}")
        if n_microbatches < 1:
            raise ValueError(f"parallel.n_microbatches: must be >= 1, got {n_microbatches}")
        if schedule == "1f1b" and n_microbatches < world_size:
            raise ValueError(f"parallel.n_microbatches: 1F1B needs at least one micro-batch per stage "
                             f"(world_size={world_size}), got {n_microbatches}")
        self.n_microbatches = n_microbatches
        self.schedule = schedule
        self.is_first, self.is_last = rank == 0, rank == world_size - 1
        self.model: Optional[nn.Module] = None
        self.stage: Optional[_StageForward] = None
        self.pipe = None  # the schedule, built for one batch shape
        self.pipe_shape: Optional[tuple[int, ...]] = None
        self.scale = 1.0
        self.stats: list[torch.Tensor] = []

    def check(self, model: nn.Module, cfg, diffusion=None) -> None:
        mc = model.config
        if not mc.causal:
            raise ValueError("model.causal: pipeline training needs a causal model (no diffusion objective)")
        for name in ("reversible", "act"):
            if getattr(mc, name):
                raise ValueError(f"model.{name}: not supported by the pipeline strategy (the stack is split by block)")
        if mc.n_layers < self.world_size:
            raise ValueError(f"model.n_layers: {mc.n_layers} layers cannot fill {self.world_size} pipeline stages")
        if mc.n_streams > 1:
            raise ValueError(f"model.n_streams: the pipeline strategy runs text rows only, got {mc.n_streams}")
        if cfg.batch_size % self.n_microbatches:
            raise ValueError(f"train.batch_size: {cfg.batch_size} is not divisible by "
                             f"parallel.n_microbatches={self.n_microbatches}")
        if cfg.compress_prob > 0:
            raise ValueError("train.compress_prob: compression-aware training is not supported by the "
                             "pipeline strategy")
        for name in ("lambda_k", "lambda_c", "lambda_s"):
            if getattr(cfg, name) > 0:
                raise ValueError(f"train.{name}: telemetry regularisers are not supported by the pipeline strategy")

    def wrap(self, model: nn.Module) -> nn.Module:
        layers = stage_layers(model.config.n_layers, self.world_size, self.rank)
        prune_to_stage(model, layers, is_first=self.is_first, is_last=self.is_last)
        self.model = model
        self.stage = _StageForward(model)
        self.device = model.reference_marginals.device
        self.dtype = next(model.parameters()).dtype
        return model

    def _schedule_for(self, shape: tuple[int, ...]):
        # the stage infers its send/recv buffers from the first step, so a new batch shape needs a new one
        if self.pipe is None or shape != self.pipe_shape:
            if not dist.is_initialized():
                raise RuntimeError("strategy 'pipeline' needs an initialised process group "
                                   f"(world_size={self.world_size})")
            from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

            stage = PipelineStage(self.stage, self.rank, self.world_size, self.device)
            cls = ScheduleGPipe if self.schedule == "gpipe" else Schedule1F1B
            # scale_grads=False: the schedule would divide every .grad, gradients accumulated by
            # earlier calls included; the loss carries scale / n_microbatches instead
            self.pipe = cls(stage, self.n_microbatches, loss_fn=self._loss_fn, scale_grads=False)
            self.pipe_shape = shape
        return self.pipe

    def _loss_fn(self, out: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        result = causal_loss(self.model.readout(out, ids), ids, self.model.config)
        self.stats.append(torch.stack([result.loss.detach(), result.nll_bits]))
        return result.loss * (self.scale / self.n_microbatches)  # equal micro-batches: the sum is the batch mean

    def forward_backward(self, batch: torch.Tensor, scale: float) -> LossOutput:
        """One schedule step over the (B, L) byte batch (the same on every rank); grads += scale * d loss."""
        B, L = batch.shape
        if B % self.n_microbatches:
            raise ValueError(f"train.batch_size: {B} is not divisible by parallel.n_microbatches={self.n_microbatches}")
        ids = model_inputs(self.model, batch.to(self.device))
        self.model.check_ids(ids)
        pipe = self._schedule_for(tuple(ids.shape))
        self.scale, self.stats = scale, []
        target = ids if self.is_last else None
        if self.is_first:
            pipe.step(ids, target=target, return_outputs=False)
        else:
            pipe.step(target=target, return_outputs=False)
        summary = torch.zeros(2, device=self.device)
        if self.is_last:
            # the stage's first call also runs the loss once on placeholder tensors to infer shapes
            stats = torch.stack(self.stats[-self.n_microbatches:])
            summary = torch.stack([stats[:, 0].mean(), stats[:, 1].sum()]).float()
        if self.world_size > 1:
            dist.broadcast(summary, src=self.world_size - 1)
        return LossOutput(loss=summary[0], nll_bits=summary[1], n_bytes=B * (L - 1))

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        squared = torch.zeros((), device=self.device)
        for g in grads:
            squared += g.detach().float().pow(2).sum()
        if self.world_size > 1:
            dist.all_reduce(squared)
        total = squared.sqrt()
        factor = (max_norm / (total + 1e-6)).clamp(max=1.0)  # torch.nn.utils.clip_grad_norm_'s rule
        for g in grads:
            g.mul_(factor.to(g.dtype))
        return float(total)

    @torch.no_grad()
    def eval_logits(self, model: nn.Module, ids: torch.Tensor) -> Optional[torch.Tensor]:
        """Relay one batch through the stages (no schedule, no backward); logits on the last rank, else None."""
        x = ids
        if not self.is_first:
            cfg = model.config
            n = ids.shape[1] // cfg.bits_per_byte + 1 if cfg.arch == "patched" else ids.shape[1]  # + BOS
            x = torch.empty(ids.shape[0], n, cfg.d_model, device=self.device)
            dist.recv(x, src=self.rank - 1)
            x = x.to(self.dtype)
        out = self.stage(x)
        if not self.is_last:
            dist.send(out.float().contiguous(), dst=self.rank + 1)
            return None
        return model.readout(out, ids)

    def share(self, result: Any) -> Any:
        """The last stage's result (the only rank with logits) on every rank."""
        shared = [result]
        if self.world_size > 1:
            dist.broadcast_object_list(shared, src=self.world_size - 1, device=self.device)
        return shared[0]

    def full_state(self, model, optimizer):
        mine = (cpu_state(model), cpu_optimizer_state(named_optimizer_state(model, optimizer)))
        gathered: Optional[list] = [None] * self.world_size if self.rank == 0 else None
        if self.world_size > 1:
            dist.gather_object(mine, gathered, dst=0)
        else:
            gathered = [mine]
        if self.rank != 0:
            return None
        model_state: dict[str, torch.Tensor] = {}
        state: dict[str, Any] = {}
        for part, optim in gathered:
            model_state.update(part)  # buffers (reference_marginals) are the same on every rank
            state.update(optim["state"])
        groups = [dict(g) for g in gathered[0][1]["param_groups"]]
        for _, optim in gathered[1:]:
            for group, other in zip(groups, optim["param_groups"]):
                group["params"] = group["params"] + other["params"]
        return model_state, {"state": state, "param_groups": groups}

    def load_full_state(self, model, optimizer, model_state, optimizer_state):
        target = unwrap(model)
        own = target.state_dict()
        missing = [k for k in own if k not in model_state]
        if missing:
            raise ValueError(f"checkpoint weights do not match the model (missing {missing})")
        target.load_state_dict({k: model_state[k] for k in own}, strict=True)
        if optimizer is not None and optimizer_state is not None:
            load_named_optimizer_state(model, optimizer, optimizer_state)
