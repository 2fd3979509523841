"""BitTransformerLM: bits (or bytes, for the baseline) in, next-bit or denoising logits out.

The architecture body (bitlm.flat or bitlm.patched) turns ids into logits, embed -> stack -> head,
skipping what a pipeline stage does not own; this class owns what every architecture shares: the
config, input checks, the corpus reference of the S metric, telemetry and the decoding entry
points used by bitlm.sampling.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from . import telemetry as tm
from .attention import DecodeState, KVCache, sinusoidal_table  # noqa: F401  (sinusoidal_table: re-exported)
from .codec import bytes_to_bit_tensor
from .config import ModelConfig
from .flat import FlatBody
from .patched import PatchedBody

MASK = 2  # input id of a masked bit (diffusion mode); bits are 0 and 1
BYTE_MASK = 256  # input id of a masked byte in the byte baseline


class BitTransformerLM(nn.Module):
    """A transformer language model over bits (`flat` or `patched`) or bytes (the baseline)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.body = PatchedBody(config) if config.arch == "patched" else FlatBody(config)
        self.n_inputs, self.n_outputs = self.body.n_inputs, self.body.n_outputs
        # which stream a row carries (0 = text; 1 = its RLE-compressed bits, in compression-aware training)
        self.stream_embed = nn.Embedding(config.n_streams, config.d_model) if config.n_streams > 1 else None
        # per-phase P(bit=1) of the training corpus: the reference of the symbiosis metric S
        self.register_buffer("reference_marginals", torch.full((config.bits_per_byte,), 0.5))
        self.apply(_init_weights)
        self.body.stack.init_halting()
        _zero_init(self.body, config)

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
                local_prefix: Optional[torch.Tensor] = None, attention_maps: Optional[bool] = None,
                readout: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
        """Logits (B, T, 2) for bits or (B, T, 256) for bytes, and telemetry when asked.

        Causal: logits[:, t] predicts id t+1 from ids <= t. Non-causal (diffusion):
        logits[:, t] predicts the clean value at position t. `stream` (B,) marks rows that carry
        another stream (model.n_streams > 1); None means every row is text (stream 0).
        attention_maps: return per-layer (B, nh, T, T_k) maps in the telemetry (default: model.full_attn_logging).
        A pipeline stage after the first takes hidden states instead of ids; readout=False makes the
        patched body stop at its per-byte features (see `readout`).
        """
        causal = self.config.causal if causal is None else causal
        if x.is_floating_point():  # hidden states of an earlier pipeline stage
            logits, _ = self.body(x, causal=causal, **({} if readout else {"readout": False}))
            return logits, {}
        self.check_ids(x, cache)
        want_maps = return_telemetry and (self.config.full_attn_logging if attention_maps is None else attention_maps)
        offset = None
        if self.stream_embed is not None:
            ids = stream if stream is not None else torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            offset = self.stream_embed(ids)[:, None, :]
        elif stream is not None:
            raise ValueError("stream ids need a model with model.n_streams > 1")
        extra = {} if local_prefix is None else {"local_prefix": local_prefix}  # patched diffusion only
        if not readout:
            extra["readout"] = False
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

    def readout(self, out: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Causal logits from what forward(readout=False) returned for `ids` (the patched tree reads the bits)."""
        return self.body.readout(out, ids)

    @torch.no_grad()
    def start_decoding(self, ids: torch.Tensor, capacity: Optional[int] = None) -> tuple[DecodeState, torch.Tensor]:
        """Read a (B, T) causal prefix; returns the decoding state and the logits of id T."""
        self.check_ids(ids, None)
        return self.body.start_decoding(ids, self.new_cache(ids.shape[0], capacity))

    @torch.no_grad()
    def decode_next(self, state: DecodeState, next_ids: torch.Tensor) -> torch.Tensor:
        """Append one id per row (B,); returns the logits (B, V) of the id after it."""
        return self.body.decode_next(state, next_ids)

    def check_ids(self, x: torch.Tensor, cache: Optional[KVCache] = None) -> None:
        """ValueError unless `x` fits the context (after what `cache` holds) and holds valid ids."""
        start = cache.length if cache is not None else 0  # only flat bodies decode through forward
        if start + x.shape[1] > self.config.max_input_ids:
            raise ValueError(f"sequence of {start + x.shape[1]} ids exceeds the model's {self.config.max_input_ids} "
                             f"(model.max_positions={self.config.max_positions}); use infer_long_sequence for longer inputs")
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


def _zero_init(body: nn.Module, cfg: ModelConfig) -> None:
    """model.zero_init_residual and model.zero_init_head, applied over _init_weights (biases already are 0)."""
    if cfg.zero_init_residual:  # every block starts as the identity; its reads stay random so gradients flow
        for _, block in body.stack.owned():
            nn.init.zeros_(block.attn.proj.weight)
            nn.init.zeros_(block.mlp[2].weight)
    if cfg.zero_init_head:
        # patched: the projection A that starts to_local; z = A h is then 0 (the residual MLPs after it
        # map 0 to 0 while their biases are 0), so every tree node's logit starts at its bias
        if cfg.arch != "patched":
            nn.init.zeros_(body.head.weight)
        elif cfg.local_d_ff:
            nn.init.zeros_(body.to_local[0].weight)
        else:  # no projection: the tree's node (or pattern) vectors are the head
            nn.init.zeros_(body.readout_embeddings[0].weight)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
