"""BitTransformerLM: bits (or bytes, for the baseline) in, next-bit or denoising logits out.

The architecture body (`flat` here, `patched` in bitlm.patched) turns ids into logits; this
class owns what every architecture shares: the config, input checks, the corpus reference of
the S metric, telemetry and the decoding entry points used by bitlm.sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from . import telemetry as tm
from .attention import KVCache
from .blocks import BlockStack, StackOutput
from .codec import bytes_to_bit_tensor
from .config import ModelConfig

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


@dataclass
class DecodeState:
    """Incremental causal decoding of one batch: the KV cache plus whatever the body needs."""

    cache: KVCache
    extra: Any = None  # per-architecture state (the patched body keeps the current byte here)


class FlatBody(nn.Module):
    """One transformer position per input id: the seeds' design, and the byte baseline."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        is_bits = cfg.representation == "bit"
        self.n_inputs = 3 if is_bits else 257  # + MASK
        self.n_outputs = 2 if is_bits else 256
        self.embed = nn.Embedding(self.n_inputs, cfg.d_model)
        # byte phase = position mod bits-per-byte: tells each bit which bit of its byte it is
        self.phase = nn.Embedding(cfg.bits_per_byte, cfg.d_model) if is_bits else None
        self.register_buffer("positions", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False)
        self.stack = BlockStack(cfg)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, self.n_outputs)

    @property
    def cache_capacity(self) -> int:
        return self.cfg.max_seq_len

    def forward(self, x: torch.Tensor, *, causal: bool, cache: Optional[KVCache] = None,
                return_weights: bool = False, offset: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, StackOutput]:
        start = cache.length if cache is not None else 0
        T = x.shape[1]
        h = self.embed(x) + self.positions[start:start + T]  # (B, T, d)
        if offset is not None:  # (B, 1, d): the stream marker of each row
            h = h + offset
        if self.phase is not None:
            h = h + self.phase(torch.arange(start, start + T, device=x.device) % self.cfg.bits_per_byte)
        out = self.stack(h, causal=causal, cache=cache, return_weights=return_weights)
        if cache is not None:
            cache.advance(T)
        return self.head(self.norm(out.hidden.to(h.dtype))), out

    def start_decoding(self, ids: torch.Tensor, cache: KVCache) -> tuple[DecodeState, torch.Tensor]:
        logits, _ = self(ids, causal=True, cache=cache)
        return DecodeState(cache=cache), logits[:, -1]

    def decode_next(self, state: DecodeState, next_ids: torch.Tensor) -> torch.Tensor:
        logits, _ = self(next_ids[:, None], causal=True, cache=state.cache)
        return logits[:, -1]


class BitTransformerLM(nn.Module):
    """A transformer language model over bits (`flat` or `patched`) or bytes (the baseline)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        if config.arch == "patched":
            from .patched import PatchedBody

            self.body = PatchedBody(config)
        else:
            self.body = FlatBody(config)
        self.n_inputs, self.n_outputs = self.body.n_inputs, self.body.n_outputs
        # which stream a row carries (0 = text; 1 = its RLE-compressed bits, in compression-aware training)
        self.stream_embed = nn.Embedding(config.n_streams, config.d_model) if config.n_streams > 1 else None
        # per-phase P(bit=1) of the training corpus: the reference of the symbiosis metric S
        self.register_buffer("reference_marginals", torch.full((config.bits_per_byte,), 0.5))
        self.apply(_init_weights)
        self.body.stack.init_halting()

    @property
    def causal(self) -> bool:
        return self.config.causal

    def num_parameters(self, *, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
        return n

    def set_reference_marginals(self, marginals) -> None:
        """Store the corpus' per-phase bit marginals (length bits_per_byte) used by S."""
        values = torch.as_tensor(marginals, dtype=torch.float32).flatten()
        if values.numel() != self.config.bits_per_byte:
            raise ValueError(f"reference marginals: expected {self.config.bits_per_byte} values, got {values.numel()}")
        self.reference_marginals.copy_(values.to(self.reference_marginals.device))

    def new_cache(self, batch_size: int, capacity: Optional[int] = None) -> KVCache:
        """An empty KV cache of `capacity` transformer positions (default: the body's maximum)."""
        cfg = self.config
        p = self.reference_marginals
        return KVCache(cfg.n_layers, batch_size, cfg.n_heads, cfg.head_dim, capacity or self.body.cache_capacity,
                       device=p.device, dtype=next(self.parameters()).dtype)

    def forward(self, x: torch.Tensor, *, causal: Optional[bool] = None, cache: Optional[KVCache] = None,
                return_telemetry: bool = False, stream: Optional[torch.Tensor] = None,
                local_prefix: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Logits (B, T, 2) for bits or (B, T, 256) for bytes, and telemetry when asked.

        Causal: logits[:, t] predicts id t+1 from ids <= t. Non-causal (diffusion):
        logits[:, t] predicts the clean value at position t. `stream` (B,) marks rows that carry
        another stream (model.n_streams > 1); None means every row is text (stream 0).
        """
        causal = self.config.causal if causal is None else causal
        self._check_ids(x, cache)
        want_maps = return_telemetry and self.config.full_attn_logging
        offset = None
        if self.stream_embed is not None:
            ids = stream if stream is not None else torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            offset = self.stream_embed(ids)[:, None, :]
        elif stream is not None:
            raise ValueError("stream ids need a model with model.n_streams > 1")
        extra = {} if local_prefix is None else {"local_prefix": local_prefix}  # patched diffusion only
        logits, out = self.body(x, causal=causal, cache=cache, return_weights=want_maps, offset=offset, **extra)
        if not return_telemetry:
            return logits, {}
        telemetry = self._telemetry(x, logits.detach())
        if out.halt_probs is not None:
            telemetry["halt_probs"] = out.halt_probs.detach()
            telemetry["ponder_cost"] = out.ponder_cost.detach()
        if want_maps:
            telemetry["attention_maps"] = [m.detach() for m in out.attention_maps]
        return logits, telemetry

    @torch.no_grad()
    def start_decoding(self, ids: torch.Tensor, capacity: Optional[int] = None) -> tuple[DecodeState, torch.Tensor]:
        """Read a (B, T) causal prefix; returns the decoding state and the logits of id T."""
        self._check_ids(ids, None)
        return self.body.start_decoding(ids, self.new_cache(ids.shape[0], capacity))

    @torch.no_grad()
    def decode_next(self, state: DecodeState, next_ids: torch.Tensor) -> torch.Tensor:
        """Append one id per row (B,); returns the logits (B, V) of the id after it."""
        return self.body.decode_next(state, next_ids)

    def _check_ids(self, x: torch.Tensor, cache: Optional[KVCache]) -> None:
        start = cache.length if cache is not None else 0  # only flat bodies decode through forward
        if start + x.shape[1] > self.config.max_input_ids:
            raise ValueError(f"sequence of {start + x.shape[1]} ids exceeds the model's {self.config.max_input_ids} "
                             f"(model.max_seq_len={self.config.max_seq_len}); use infer_long_sequence for longer inputs")
        # the value check reads the tensor back: skip it where that would sync a GPU or break a compiled graph
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.n_inputs):
            raise ValueError(f"input ids must be in [0, {self.n_inputs - 1}] for representation="
                             f"{self.config.representation!r}, got range [{int(x.min())}, {int(x.max())}]")

    def _telemetry(self, x: torch.Tensor, logits: torch.Tensor) -> dict[str, Any]:
        """K from the predictions; C and S from the input bits (MASK entries count as 0)."""
        if self.config.representation == "bit":
            bits = torch.where(x == MASK, torch.zeros_like(x), x)
            p_one = logits.float().softmax(-1)[..., 1]
            return tm.telemetry_summary(bits, p_one, self.reference_marginals, self.config.bits_per_byte)
        # byte baseline: same C and S on the bits of its bytes; K from the 256-way entropy per bit
        byte_ids = torch.where(x == BYTE_MASK, torch.zeros_like(x), x)
        bits = bytes_to_bit_tensor(byte_ids, parity=self.config.parity)
        summary = tm.telemetry_summary(bits, torch.full(bits.shape, 0.5, device=bits.device),
                                       self.reference_marginals, self.config.bits_per_byte)
        summary["negentropy"] = tm.byte_negentropy(logits.softmax(-1))
        return summary


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
