"""Pre-norm transformer blocks and the stack that runs them plain, reversible or with ACT.

Activation checkpointing is applied to the blocks from outside (bitlm.parallel); a pipeline stage
sets the blocks it does not own to None, and the stack skips them (indices, and so parameter
names and KV-cache layers, stay those of the full model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .attention import KVCache, SelfAttention
from .config import ModelConfig
from .reversible import reversible_stack


def make_norm(kind: str, d: int) -> nn.Module:
    """The model's normalisation over the last `d` features: model.norm "layer" or "rms"."""
    return nn.RMSNorm(d, eps=1e-5) if kind == "rms" else nn.LayerNorm(d)


class SquaredReLU(nn.Module):
    """relu(x)^2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).square()


class SwiGLU(nn.Module):
    """silu(gate) * value of (..., 2 d_ff) inputs holding each hidden unit's (gate, value) pair side by side.

    Interleaved rather than two halves, so the first 2 k features are the first k units: growing
    d_ff (bitlm.scaling, bitlm.distill.widen) keeps the old units in the leading rows of mlp[0].
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = x.unflatten(-1, (-1, 2)).unbind(-1)
        return nn.functional.silu(gate) * value


def make_mlp(cfg: ModelConfig) -> nn.Sequential:
    """The block's MLP, (up, activation, down, dropout) for every kind, so mlp[0] and mlp[2] name the projections.

    swiglu's up projection computes W1 x and W3 x together (2 d_ff outputs) and keeps d_ff as the
    hidden width, so it has 1.5x the MLP parameters of gelu and relu2.
    """
    d, d_ff = cfg.d_model, cfg.d_ff
    if cfg.mlp == "swiglu":
        up, act = nn.Linear(d, 2 * d_ff), SwiGLU()
    else:
        up, act = nn.Linear(d, d_ff), SquaredReLU() if cfg.mlp == "relu2" else nn.GELU()
    return nn.Sequential(up, act, nn.Linear(d_ff, d), nn.Dropout(cfg.dropout))


class Block(nn.Module):
    """x -> x + F(x), then + G(.): F is attention, G the MLP, each behind its own norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = make_norm(cfg.norm, cfg.d_model)
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout, cfg.chunk_size, qk_norm=cfg.qk_norm,
                                  rotary=cfg.position_encoding == "rotary")
        self.ln2 = make_norm(cfg.norm, cfg.d_model)
        self.mlp = make_mlp(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def attend(self, x: torch.Tensor, *, causal: bool, cache: Optional[KVCache] = None, layer: int = 0,
               return_weights: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """F(x) and, when asked, its attention weights (B, nh, T, T_k)."""
        y, weights = self.attn(self.ln1(x), causal=causal, cache=cache, layer=layer, return_weights=return_weights)
        return self.resid_dropout(y), weights

    def f(self, x: torch.Tensor, *, causal: bool) -> torch.Tensor:
        return self.attend(x, causal=causal)[0]

    def g(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln2(x))

    def f_parameters(self) -> list[nn.Parameter]:
        return [*self.ln1.parameters(), *self.attn.parameters()]

    def g_parameters(self) -> list[nn.Parameter]:
        return [*self.ln2.parameters(), *self.mlp.parameters()]

    def forward(self, x: torch.Tensor, *, causal: bool) -> torch.Tensor:
        x = x + self.f(x, causal=causal)
        return x + self.g(x)


@dataclass
class StackOutput:
    hidden: torch.Tensor  # (B, T, d)
    halt_probs: Optional[torch.Tensor] = None  # (B, n_layers, T)
    ponder_cost: Optional[torch.Tensor] = None  # (B, T): expected number of layers used
    attention_maps: list[torch.Tensor] = field(default_factory=list)  # per layer (B, nh, T, T_k)


class BlockStack(nn.Module):
    """The layers shared by every architecture; options are applied here, never inside a block."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.halt = nn.Linear(cfg.d_model, 1) if cfg.act else None
        self.init_halting()

    def init_halting(self) -> None:
        """Start the halting unit near "keep going" so early training uses the whole depth."""
        if self.halt is not None:
            nn.init.zeros_(self.halt.weight)
            nn.init.constant_(self.halt.bias, -2.0)

    def forward(self, x: torch.Tensor, *, causal: bool, cache: Optional[KVCache] = None,
                return_weights: bool = False) -> StackOutput:
        maps: list[torch.Tensor] = []  # filled per layer when return_weights
        if self.cfg.reversible:
            if cache is None and not return_weights and torch.is_grad_enabled():
                states = self._reversible(x, causal, per_layer=self.halt is not None)
            else:
                states = self._coupled_inference(x, causal, cache, return_weights, maps)
        else:
            states = self._plain(x, causal, cache, return_weights, self.halt is not None, maps)
        out = self._act(states) if self.halt is not None else StackOutput(hidden=states[-1])
        out.attention_maps = maps
        return out

    def owned(self) -> list[tuple[int, Block]]:
        """(layer index, block) of the blocks this stack runs (a pipeline stage holds None for the others)."""
        return [(i, b) for i, b in enumerate(self.blocks) if b is not None]

    def _plain(self, x, causal, cache, return_weights, keep_all, maps) -> list[torch.Tensor]:
        states = []
        for i, block in self.owned():
            if cache is not None or return_weights:
                y, weights = block.attend(x, causal=causal, cache=cache, layer=i, return_weights=return_weights)
                x = x + y
                x = x + block.g(x)
                if return_weights:
                    maps.append(weights)
            else:
                x = block(x, causal=causal)
            if keep_all:
                states.append(x)
        return states if keep_all else [x]

    def _reversible(self, x, causal, per_layer: bool) -> list[torch.Tensor]:
        # residual streams stay fp32 so the subtraction that rebuilds inputs in backward is exact enough
        x1 = x2 = x.float()
        replay = self.training and self.cfg.dropout > 0
        blocks = [b for _, b in self.owned()]
        if not per_layer:
            x1, x2 = reversible_stack(x1, x2, blocks, causal=causal, replay_rng=replay)
            return [(x1 + x2) / 2]
        states = []
        for block in blocks:  # ACT needs every layer's state, so couple one block at a time
            x1, x2 = reversible_stack(x1, x2, [block], causal=causal, replay_rng=replay)
            states.append((x1 + x2) / 2)
        return states

    def _coupled_inference(self, x, causal, cache, return_weights, maps=None) -> list[torch.Tensor]:
        """The same coupling without the custom Function: for caching, attention maps or no-grad runs."""
        x1 = x2 = x.float()
        states = []
        for i, block in self.owned():
            y, weights = block.attend(x2, causal=causal, cache=cache, layer=i, return_weights=return_weights)
            x1 = x1 + y
            x2 = x2 + block.g(x1)
            states.append((x1 + x2) / 2)
            if return_weights and maps is not None:
                maps.append(weights)
        return states

    def _act(self, states: list[torch.Tensor]) -> StackOutput:
        """Graves-style ACT: each position's output mixes layer states by halting weights.

        All layers still run (dense compute); a halted position's later states get weight 0.
        """
        B, T, _ = states[0].shape
        cumulative = states[0].new_zeros(B, T)
        mixed = torch.zeros_like(states[0])
        ponder = states[0].new_zeros(B, T)
        probs = []
        last = len(states) - 1
        for i, h in enumerate(states):
            p = torch.sigmoid(self.halt(h)).squeeze(-1)  # (B, T)
            probs.append(p)
            running = cumulative < self.cfg.act_threshold
            halts_now = (cumulative + p >= self.cfg.act_threshold) | (i == last)
            weight = torch.where(halts_now, 1.0 - cumulative, p) * running
            mixed = mixed + weight.unsqueeze(-1) * h
            cumulative = cumulative + weight
            ponder = ponder + running.to(h.dtype)
        return StackOutput(hidden=mixed, halt_probs=torch.stack(probs, dim=1), ponder_cost=ponder)
