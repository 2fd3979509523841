"""Pipeline-parallel training of a BitTransformerLM: each rank runs one contiguous slice of the blocks.

Stage r holds blocks [lo_r, hi_r) of `model.body.stack.blocks` (balanced, contiguous); the first
stage also holds the input embedding (flat) or byte encoder + BOS (patched), the last the output
norm and head (flat) or norm, to_local and the local tree decoder (patched). The other ranks'
modules are removed from the model itself (blocks become nn.Identity so ModuleList indices, and
therefore parameter names, stay those of the full model), so `model.parameters()` is exactly this
rank's share and `model.state_dict()` a subset of the full model's.

Training steps run a torch.distributed.pipelining schedule (GPipe or 1F1B) over n_microbatches;
evaluation is a plain forward relay with send/recv. Only torch.distributed is used: gloo on CPU,
NCCL on CUDA (the model's device).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .evaluation import causal_prediction_telemetry
from .objective import LossOutput, model_inputs
from .parallel import Strategy, cpu_state, load_named_optimizer_state, named_optimizer_state

SCHEDULES = ("gpipe", "1f1b")
LN2 = math.log(2.0)


def stage_layers(n_layers: int, world_size: int, rank: int) -> range:
    """The blocks stage `rank` runs: contiguous, sizes differing by at most one (earlier stages larger)."""
    base, extra = divmod(n_layers, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


class _Stage(nn.Module):
    """One rank's slice as a module: ids (first stage) or hidden states in; hidden states out, or on the
    last stage the head's output (flat: logits (B, T, V); patched: per-byte local features (B, L+1, h))."""

    def __init__(self, model: nn.Module, layers: range, *, is_first: bool, is_last: bool):
        super().__init__()
        self.model = model
        self.layers = layers
        self.is_first, self.is_last = is_first, is_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        body, cfg = self.model.body, self.model.config
        patched = cfg.arch == "patched"
        if self.is_first:
            x = _embed_patched(body, x) if patched else _embed_flat(body, x)
        for i in self.layers:
            block = body.stack.blocks[i]
            if cfg.checkpoint_activations and torch.is_grad_enabled():
                x = checkpoint(block, x, causal=True, use_reentrant=False)
            else:
                x = block(x, causal=True)
        if self.is_last:
            h = body.norm(x)
            return body.to_local(h) if patched else body.head(h)
        return x


def _embed_flat(body: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    T = ids.shape[1]
    h = body.embed(ids) + body.positions[:T]  # (B, T, d)
    if body.phase is not None:
        h = h + body.phase(torch.arange(T, device=ids.device) % body.cfg.bits_per_byte)
    return h


def _embed_patched(body: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    B, T = ids.shape
    L = T // body.bits_per_byte
    encoded = body.encode_bytes(ids.view(B, L, body.bits_per_byte))  # (B, L, d)
    shifted = torch.cat([body.bos.expand(B, 1, -1).to(encoded.dtype), encoded], dim=1)  # BOS, bytes < L
    return shifted + body.positions[:L + 1]  # (B, L+1, d)


def _drop_unused(model: nn.Module, layers: range, *, is_first: bool, is_last: bool) -> None:
    """Remove from `model` the modules another rank runs (in place)."""
    body = model.body
    blocks = body.stack.blocks
    for i in range(len(blocks)):
        if i not in layers:
            blocks[i] = nn.Identity()  # keeps the indices, so parameter names stay the full model's
    patched = model.config.arch == "patched"
    if not is_first:
        for name in ("byte_bits", "byte_mlp", "bos") if patched else ("embed", "phase"):
            setattr(body, name, None)
    if not is_last:
        for name in ("norm", "to_local", "node_vectors", "node_bias") if patched else ("norm", "head"):
            setattr(body, name, None)


def _positions(cfg, n_ids: int) -> int:
    """Transformer positions between the stages for an input of n_ids ids."""
    return n_ids // cfg.bits_per_byte + 1 if cfg.arch == "patched" else n_ids


class PipelineStrategy(Strategy):
    """Pipeline parallelism over world_size ranks, one stage per rank, GPipe or 1F1B micro-batching.

    Every rank must pass the same batch to forward_backward. On CUDA, call torch.cuda.set_device
    on each rank first: the object collectives (evaluate, full_state) use the current device.
    """

    name = "pipeline"
    owns_backward = True

    def __init__(self, *, rank: int = 0, world_size: int = 1, n_microbatches: int = 4, schedule: str = "gpipe"):
        super().__init__(rank=rank, world_size=world_size)
        if schedule not in SCHEDULES:
            raise ValueError(f"pipeline.schedule: must be one of {list(SCHEDULES)}, got {schedule!r}")
        if n_microbatches < 1:
            raise ValueError(f"pipeline.n_microbatches: must be >= 1, got {n_microbatches}")
        if schedule == "1f1b" and n_microbatches < world_size:
            raise ValueError(f"pipeline.n_microbatches: 1F1B needs at least one micro-batch per stage "
                             f"(world_size={world_size}), got {n_microbatches}")
        self.n_microbatches = n_microbatches
        self.schedule = schedule
        self.is_first, self.is_last = rank == 0, rank == world_size - 1
        self._model: Optional[nn.Module] = None
        self._stage: Optional[_Stage] = None
        self._pipe = None  # the schedule, built for one batch shape
        self._pipe_shape: Optional[tuple[int, ...]] = None
        self._scale = 1.0
        self._stats: list[torch.Tensor] = []

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
                             f"pipeline.n_microbatches={self.n_microbatches}")
        if cfg.compress_prob > 0:
            raise ValueError("train.compress_prob: compression-aware training is not supported by the "
                             "pipeline strategy")
        for name in ("lambda_k", "lambda_c", "lambda_s"):
            if getattr(cfg, name) > 0:
                raise ValueError(f"train.{name}: telemetry regularisers are not supported by the pipeline strategy")

    def wrap(self, model: nn.Module) -> nn.Module:
        layers = stage_layers(model.config.n_layers, self.world_size, self.rank)
        _drop_unused(model, layers, is_first=self.is_first, is_last=self.is_last)
        self._model = model
        self._stage = _Stage(model, layers, is_first=self.is_first, is_last=self.is_last)
        self.device = model.reference_marginals.device
        self._dtype = next(model.parameters()).dtype
        return model

    # --- training -----------------------------------------------------------------------------

    def _schedule_for(self, shape: tuple[int, ...]):
        # the stage infers its send/recv buffers from the first step, so a new batch shape needs a new one
        if self._pipe is None or shape != self._pipe_shape:
            if not dist.is_initialized():
                raise RuntimeError("strategy 'pipeline' needs an initialised process group "
                                   f"(world_size={self.world_size})")
            from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

            stage = PipelineStage(self._stage, self.rank, self.world_size, self.device)
            cls = ScheduleGPipe if self.schedule == "gpipe" else Schedule1F1B
            # scale_grads=False: the schedule would divide every .grad, gradients accumulated by
            # earlier calls included; the loss carries scale / n_microbatches instead
            self._pipe = cls(stage, self.n_microbatches, loss_fn=self._loss_fn, scale_grads=False)
            self._pipe_shape = shape
        return self._pipe

    def _logits(self, out: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Next-id logits (B, T, V) from the last stage's output, in causal_loss's layout."""
        if self._model.config.arch != "patched":
            return out
        # The local tree decoder reads each byte's earlier bits. They reach the last stage as the
        # schedule's target (the input ids, which it already needs for the loss), so no extra tensor
        # travels down the pipe; node_vectors/node_bias live on this rank and get their gradients
        # from the loss's backward.
        body = self._model.body
        B, T = ids.shape
        bpb = body.bits_per_byte
        bits = ids.view(B, T // bpb, bpb)
        padded = torch.cat([bits, torch.zeros_like(bits[:, :1])], dim=1)  # byte L's bits are unknown (unused)
        phases = torch.arange(bpb, device=ids.device)
        per_bit = body._local_logits(out, padded[..., :-1], phases).reshape(B, -1, 2)
        return per_bit[:, 1:T + 1]  # per_bit[:, k] predicts bit k; logits[:, t] must predict bit t + 1

    @staticmethod
    def _per_position(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(B, T-1) next-id cross-entropy in nats, as causal_loss computes it."""
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                               reduction="none").view(ids.shape[0], -1)

    def _nll_bits(self, per_position: torch.Tensor) -> torch.Tensor:
        return per_position[:, self._model.config.ids_per_byte - 1:].detach().sum() / LN2

    def _loss_fn(self, out: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        per_position = self._per_position(self._logits(out, ids), ids)
        loss = per_position.mean()
        self._stats.append(torch.stack([loss.detach(), self._nll_bits(per_position)]))
        return loss * (self._scale / self.n_microbatches)  # equal micro-batches: the sum is the batch mean

    def forward_backward(self, batch: torch.Tensor, scale: float) -> LossOutput:
        """One schedule step over the (B, L) byte batch (the same on every rank); grads += scale * d loss."""
        B, L = batch.shape
        if B % self.n_microbatches:
            raise ValueError(f"train.batch_size: {B} is not divisible by pipeline.n_microbatches={self.n_microbatches}")
        ids = model_inputs(self._model, batch.to(self.device))
        self._model._check_ids(ids, None)
        pipe = self._schedule_for(tuple(ids.shape))
        self._scale, self._stats = scale, []
        target = ids if self.is_last else None
        if self.is_first:
            pipe.step(ids, target=target, return_outputs=False)
        else:
            pipe.step(target=target, return_outputs=False)
        summary = torch.zeros(2, device=self.device)
        if self.is_last:
            # the stage's first call also runs the loss once on placeholder tensors to infer shapes
            stats = torch.stack(self._stats[-self.n_microbatches:])
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

    # --- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def _forward_only(self, ids: torch.Tensor, autocast=None) -> Optional[torch.Tensor]:
        """Relay one batch through the stages (no schedule, no backward); logits on the last rank, else None."""
        x = ids
        if not self.is_first:
            cfg = self._model.config
            x = torch.empty(ids.shape[0], _positions(cfg, ids.shape[1]), cfg.d_model, device=self.device)
            dist.recv(x, src=self.rank - 1)
            x = x.to(self._dtype)
        with autocast() if autocast is not None else contextlib.nullcontext():
            out = self._stage(x)
        if not self.is_last:
            dist.send(out.float().contiguous(), dst=self.rank + 1)
            return None
        return self._logits(out, ids)

    def evaluate(self, model, corpus, cfg, autocast=None, diffusion=None) -> dict[str, float]:
        """bitlm.engine.evaluate's numbers (val/bpb, val/n_bytes, val/K, val/C, val/S) on every rank."""
        val = corpus.val if corpus.val.n_windows else corpus.train
        batches = list(val.sequential_batches(cfg.batch_size, cfg.context_bytes, max_batches=cfg.eval_batches))
        total_bits, n_bytes, tel = 0.0, 0, None
        was_training = model.training
        model.eval()
        try:
            for i, batch in enumerate(batches):
                ids = model_inputs(model, batch.to(self.device))
                logits = self._forward_only(ids, autocast)
                if logits is None:
                    continue
                total_bits += float(self._nll_bits(self._per_position(logits, ids)))
                n_bytes += batch.shape[0] * (batch.shape[1] - 1)
                if i == 0:  # K/C/S of the first batch, like engine.telemetry_means
                    tel = causal_prediction_telemetry(model, ids, logits.float())
        finally:
            model.train(was_training)
        result: list[Any] = [None]
        if self.is_last:
            if n_bytes == 0:
                raise ValueError("no bytes to score (empty validation set?)")
            result = [{"val/bpb": total_bits / n_bytes, "val/n_bytes": n_bytes,
                       "val/K": tel["K"], "val/C": tel["C"], "val/S": tel["S"]}]
        if self.world_size > 1:
            dist.broadcast_object_list(result, src=self.world_size - 1, device=self.device)
        return result[0]

    # --- checkpoints --------------------------------------------------------------------------

    def full_state(self, model, optimizer):
        mine = (cpu_state(model), _cpu_optimizer_state(named_optimizer_state(model, optimizer)))
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
        target = getattr(model, "_orig_mod", model)
        own = target.state_dict()
        missing = [k for k in own if k not in model_state]
        if missing:
            raise ValueError(f"checkpoint weights do not match the model (missing {missing})")
        target.load_state_dict({k: model_state[k] for k in own}, strict=True)
        if optimizer is not None and optimizer_state is not None:
            load_named_optimizer_state(model, optimizer, optimizer_state)


def _cpu_optimizer_state(named: dict[str, Any]) -> dict[str, Any]:
    state = {name: {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in s.items()}
             for name, s in named["state"].items()}
    return {"state": state, "param_groups": named["param_groups"]}
