"""BitTransformerLM: bits (or bytes, for the baseline) in, next-bit or denoising logits out."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from .attention import KVCache
from .blocks import BlockStack
from .codec import bytes_to_bit_tensor
from .config import ModelConfig
from . import telemetry as tm

MASK = 2  # input id of a masked bit (diffusion mode); bits are 0 and 1
BYTE_MASK = 256  # input id of a masked byte in the byte baseline


def sinusoidal_table(n_positions: int, d_model: int) -> torch.Tensor:
    """(n_positions, d_model) fixed sin/cos position codes."""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(n_positions, d_model)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: d_model // 2])
    return table


class BitTransformerLM(nn.Module):
    """A transformer over bit positions (`representation="bit"`) or byte positions (the baseline)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        is_bits = config.representation == "bit"
        self.n_inputs = 3 if is_bits else 257  # + MASK
        self.n_outputs = 2 if is_bits else 256
        self.embed = nn.Embedding(self.n_inputs, d)
        # byte phase = position mod bits-per-byte: tells each bit which bit of its byte it is
        self.phase = nn.Embedding(config.bits_per_byte, d) if is_bits else None
        self.register_buffer("positions", sinusoidal_table(config.max_seq_len, d), persistent=False)
        self.stack = BlockStack(config)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, self.n_outputs)
        # per-phase P(bit=1) of the training corpus: the reference of the symbiosis metric S
        self.register_buffer("reference_marginals", torch.full((config.bits_per_byte,), 0.5))
        self.apply(_init_weights)
        self.stack.init_halting()

    @property
    def causal(self) -> bool:
        return self.config.causal

    def num_parameters(self, *, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel() + (self.phase.weight.numel() if self.phase is not None else 0)
        return n

    def set_reference_marginals(self, marginals) -> None:
        """Store the corpus' per-phase bit marginals (length bits_per_byte) used by S."""
        values = torch.as_tensor(marginals, dtype=torch.float32).flatten()
        if values.numel() != self.config.bits_per_byte:
            raise ValueError(f"reference marginals: expected {self.config.bits_per_byte} values, got {values.numel()}")
        self.reference_marginals.copy_(values.to(self.reference_marginals.device))

    def new_cache(self, batch_size: int, capacity: Optional[int] = None) -> KVCache:
        """An empty KV cache sized for `capacity` positions (default: max_seq_len)."""
        cfg = self.config
        capacity = capacity or cfg.max_seq_len
        p = self.head.weight
        return KVCache(cfg.n_layers, batch_size, cfg.n_heads, cfg.head_dim, capacity, device=p.device, dtype=p.dtype)

    def forward(self, x: torch.Tensor, *, causal: Optional[bool] = None, cache: Optional[KVCache] = None,
                return_telemetry: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
        """Logits (B, T, 2) for bits or (B, T, 256) for bytes, and telemetry when asked.

        Causal: logits[:, t] predicts position t+1 from positions <= t. Non-causal (diffusion):
        logits[:, t] predicts the clean value at position t.
        """
        causal = self.config.causal if causal is None else causal
        B, T = x.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} positions exceeds model.max_seq_len="
                             f"{self.config.max_seq_len}; use infer_long_sequence for longer inputs")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.n_inputs):
            raise ValueError(f"input ids must be in [0, {self.n_inputs - 1}] for representation="
                             f"{self.config.representation!r}, got range [{int(x.min())}, {int(x.max())}]")
        h = self.embed(x) + self.positions[start:start + T]  # (B, T, d)
        if self.phase is not None:
            phase_ids = torch.arange(start, start + T, device=x.device) % self.config.bits_per_byte
            h = h + self.phase(phase_ids)
        want_maps = return_telemetry and self.config.full_attn_logging
        out = self.stack(h, causal=causal, cache=cache, return_weights=want_maps)
        if cache is not None:
            cache.advance(T)
        logits = self.head(self.norm(out.hidden.to(h.dtype)))
        if not return_telemetry:
            return logits, {}
        telemetry = self._telemetry(x, logits.detach())
        if out.halt_probs is not None:
            telemetry["halt_probs"] = out.halt_probs.detach()
            telemetry["ponder_cost"] = out.ponder_cost.detach()
        if want_maps:
            telemetry["attention_maps"] = [m.detach() for m in out.attention_maps]
        return logits, telemetry

    def _telemetry(self, x: torch.Tensor, logits: torch.Tensor) -> dict[str, Any]:
        """K from the predictions; C and S from the input bits (MASK entries count as 0)."""
        if self.config.representation == "bit":
            bits = torch.where(x == MASK, torch.zeros_like(x), x)
            p_one = logits.float().softmax(-1)[..., 1]
            return tm.telemetry_summary(bits, p_one, self.reference_marginals, self.config.bits_per_byte)
        # byte baseline: same C and S on the bits of its bytes; K from the 256-way entropy per bit
        byte_ids = torch.where(x == BYTE_MASK, torch.zeros_like(x), x)
        bits = bytes_to_bit_tensor(byte_ids, parity=self.config.parity)
        probs = logits.float().softmax(-1)
        entropy_bits = -(probs * probs.clamp_min(1e-12).log2()).sum(-1)  # (B, T)
        summary = tm.telemetry_summary(bits, torch.full(bits.shape, 0.5, device=bits.device),
                                       self.reference_marginals, self.config.bits_per_byte)
        summary["negentropy"] = 1.0 - entropy_bits.mean(-1) / 8.0
        return summary


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
