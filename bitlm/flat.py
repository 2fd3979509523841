"""The flat body: one transformer position per input id (the seeds' design, and the byte baseline).

forward is embed (+ the input convolution, model.input_conv) -> stack -> norm + head, each skipped
when the module is None: a pipeline stage is this body with the modules another stage runs set to
None (bitlm.pipelining).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .attention import DecodeState, KVCache, sinusoidal_table
from .blocks import BlockStack, StackOutput, make_norm
from .config import ModelConfig
from .input_conv import InputConv


class FlatBody(nn.Module):
    """Ids (B, T) -> logits (B, T, V); a later pipeline stage takes hidden states (B, T, d) instead."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        is_bits = cfg.representation == "bit"
        self.n_inputs = 3 if is_bits else 257  # + MASK
        self.n_outputs = 2 if is_bits else 256
        self.embed = nn.Embedding(self.n_inputs, cfg.d_model)
        # byte phase = position mod bits-per-byte: tells each bit which bit of its byte it is
        self.phase = nn.Embedding(cfg.bits_per_byte, cfg.d_model) if is_bits else None
        # over the id embeddings only (before positions, phase and stream marker), as the probe measured it
        self.input_conv = InputConv(cfg.d_model, cfg.input_conv) if cfg.input_conv else None
        # rotary position codes live in attention; then no table is added to the inputs
        table = sinusoidal_table(cfg.max_positions, cfg.d_model) if cfg.position_encoding == "sinusoidal" else None
        self.register_buffer("positions", table, persistent=False)
        self.stack = BlockStack(cfg)
        self.norm = make_norm(cfg.norm, cfg.d_model)
        self.head = nn.Linear(cfg.d_model, self.n_outputs)

    @property
    def cache_capacity(self) -> int:
        return self.cfg.max_positions

    def embed_ids(self, x: torch.Tensor, start: int, offset: Optional[torch.Tensor], *, causal: bool = True,
                  history: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, T) ids placed after `start` cached positions -> (B, T, d) stack inputs.

        history: the id embeddings before x that the causal input convolution reads (decoding).
        """
        T = x.shape[1]
        h = self.embed(x)  # (B, T, d)
        if self.input_conv is not None:
            h = self.input_conv(h, causal=causal, history=history)
        if self.positions is not None:
            h = h + self.positions[start:start + T]
        if offset is not None:  # (B, 1, d): the stream marker of each row
            h = h + offset
        if self.phase is not None:
            h = h + self.phase(torch.arange(start, start + T, device=x.device) % self.cfg.bits_per_byte)
        return h

    def forward(self, x: torch.Tensor, *, causal: bool, cache: Optional[KVCache] = None,
                return_weights: bool = False, offset: Optional[torch.Tensor] = None,
                readout: bool = True, history: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, StackOutput]:
        """readout: accepted for the patched body's sake; the flat head's output already is the logits.

        history: see embed_ids; a cache that already holds positions needs it when model.input_conv is
        set, which start_decoding / decode_next take care of.
        """
        start = cache.length if cache is not None else 0
        if start and self.input_conv is not None and history is None and self.embed is not None:
            raise ValueError("model.input_conv: a flat model with an input convolution decodes through "
                             "start_decoding/decode_next, which keep the inputs the convolution reads")
        h = self.embed_ids(x, start, offset, causal=causal, history=history) if self.embed is not None else x
        out = self.stack(h, causal=causal, cache=cache, return_weights=return_weights)
        if cache is not None:
            cache.advance(x.shape[1])
        if self.head is None:
            return out.hidden, out
        return self.head(self.norm(out.hidden.to(h.dtype))), out

    def readout(self, out: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Logits from the last stage's output: the flat head's output already is."""
        return out

    def start_decoding(self, ids: torch.Tensor, cache: KVCache) -> tuple[DecodeState, torch.Tensor]:
        state = DecodeState(cache=cache, extra={})
        return state, self._decode_step(state, ids)

    def decode_next(self, state: DecodeState, next_ids: torch.Tensor) -> torch.Tensor:
        return self._decode_step(state, next_ids[:, None])

    def _decode_step(self, state: DecodeState, ids: torch.Tensor) -> torch.Tensor:
        """Run (B, T) new ids through the cache; the logits (B, V) of the id after them.

        With model.input_conv the state keeps the last kernel - 1 id embeddings the convolution reads.
        """
        history = state.extra.get("inputs")
        logits, _ = self(ids, causal=True, cache=state.cache, history=history)
        if self.input_conv is not None:
            state.extra = {**state.extra, "inputs": self.input_conv.history(self.embed(ids), history)}
        return logits[:, -1]
