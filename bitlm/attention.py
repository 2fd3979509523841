"""Multi-head self-attention (full or chunked, causal or not), position codes, and the KV cache and state of decoding."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """Preallocated keys and values of every layer for incremental causal decoding."""

    def __init__(self, n_layers: int, batch_size: int, n_heads: int, head_dim: int, capacity: int,
                 *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (batch_size, n_heads, capacity, head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.capacity = capacity
        self.length = 0  # positions already committed; advanced once per model forward

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v (B, H, T, hd) for `layer`; return all keys and values so far."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} positions requested, capacity {self.capacity}")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


@dataclass
class DecodeState:
    """Incremental causal decoding of one batch: the KV cache plus whatever the body needs."""

    cache: KVCache
    extra: Any = None  # per-architecture state (the patched body keeps the current byte here)


def sinusoidal_table(n_positions: int, d_model: int) -> torch.Tensor:
    """(n_positions, d_model) fixed sin/cos position codes."""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(n_positions, d_model)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: d_model // 2])
    return table


def _rotary_angles(start: int, end: int, head_size: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (end - start, head_size / 2) of the rotary angles of positions start..end-1."""
    half = head_size // 2
    freq = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * (-2.0 * math.log(10000.0) / head_size))
    angle = torch.arange(start, end, device=device, dtype=torch.float32)[:, None] * freq
    return angle.cos().to(dtype), angle.sin().to(dtype)


# (head_size, device, dtype) -> cos, sin of positions 0.. : every layer and every decoding step reads
# the same angles, and computing them was ~30% of a tuned model's batch-1 decoding step on CPU
_ROTARY_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_ROTARY_TABLE_MIN = 1024


def _rotary_table(n_positions: int, head_size: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """_rotary_angles(0, n) for n >= n_positions, kept and grown by doubling (the same float32 values)."""
    key = (head_size, str(device), dtype)
    table = _ROTARY_TABLES.get(key)
    if table is None or table[0].shape[0] < n_positions:
        size = max(n_positions, _ROTARY_TABLE_MIN, 2 * (table[0].shape[0] if table is not None else 0))
        with torch.inference_mode(False):  # built while sampling, it must still serve a training step's backward
            table = _ROTARY_TABLES[key] = _rotary_angles(0, size, head_size, device, dtype)
    return table


def rotate(x: torch.Tensor, start: int) -> torch.Tensor:
    """Rotary position code: (B, nh, T, hs) queries or keys at positions start.. rotated pairwise.

    Feature i of the first half and feature i of the second half form a pair rotated by the angle
    position * 10000^(-2i/hs), so q . k depends on the positions only through their difference.
    """
    T, half = x.shape[2], x.shape[3] // 2
    if torch.compiler.is_compiling():  # a compiled graph computes its angles once anyway
        cos, sin = _rotary_angles(start, start + T, x.shape[3], x.device, x.dtype)
    else:
        cos, sin = _rotary_table(start + T, x.shape[3], x.device, x.dtype)
        cos, sin = cos[start:start + T], sin[start:start + T]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def _norm_heads(norm: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm of (B, nh, T, hs) heads with its weight in x's dtype: under autocast q and k are bf16,
    and an fp32 weight would send torch.rms_norm to its slower unfused path."""
    return F.rms_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.eps)


def attention_mask(q_start: int, n_q: int, n_k: int, *, causal: bool, chunk_size: Optional[int],
                   device: torch.device) -> Optional[torch.Tensor]:
    """Boolean (n_q, n_k) mask, True where a query may attend; None when everything is allowed."""
    if not causal and chunk_size is None:
        return None
    q_pos = torch.arange(q_start, q_start + n_q, device=device)[:, None]
    k_pos = torch.arange(n_k, device=device)[None, :]
    allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    if causal:
        allowed &= k_pos <= q_pos
    if chunk_size is not None:
        allowed &= (k_pos // chunk_size) == (q_pos // chunk_size)
    return allowed


class SelfAttention(nn.Module):
    """Multi-head attention on F.scaled_dot_product_attention, with block-local chunking."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, chunk_size: Optional[int], *,
                 qk_norm: bool = False, rotary: bool = False):
        super().__init__()
        self.n_heads = n_heads
        self.chunk_size = chunk_size
        self.dropout = dropout
        self.rotary = rotary
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        # per-head RMSNorm of q and k bounds the attention logits, whatever the scale of x
        self.q_norm = nn.RMSNorm(d_model // n_heads, eps=1e-5) if qk_norm else None
        self.k_norm = nn.RMSNorm(d_model // n_heads, eps=1e-5) if qk_norm else None

    def forward(self, x: torch.Tensor, *, causal: bool, cache: Optional[KVCache] = None, layer: int = 0,
                return_weights: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        q_start = 0
        if cache is not None:
            if not causal:
                raise ValueError("the KV cache is for causal decoding; the model is in non-causal mode")
            q_start = cache.length
        if self.q_norm is not None:
            q, k = _norm_heads(self.q_norm, q), _norm_heads(self.k_norm, k)
        if self.rotary:  # by absolute position: the cached keys were rotated by theirs
            q, k = rotate(q, q_start), rotate(k, q_start)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        p = self.dropout if self.training else 0.0
        weights = None
        if return_weights:
            y, weights = self._explicit(q, k, v, q_start, causal, p)
        elif cache is None and self.chunk_size is not None and self.chunk_size < T:
            y = self._chunked(q, k, v, causal, p)
        elif cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal)
        else:
            mask = None
            if T > 1 or self.chunk_size is not None:
                mask = attention_mask(q_start, T, k.shape[2], causal=True, chunk_size=self.chunk_size,
                                      device=x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.proj(y), weights

    def _chunked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, p: float) -> torch.Tensor:
        """Attention inside non-overlapping chunks: O(T * chunk) memory instead of O(T^2)."""
        B, H, T, hs = q.shape
        c = self.chunk_size
        n = math.ceil(T / c)
        pad = n * c - T
        if pad:
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        q, k, v = (t.view(B, H, n, c, hs) for t in (q, k, v))  # (B, nh, n_chunks, c, hs)
        mask = None
        if pad and not causal:
            # padded keys only exist in the last chunk; hide them from its queries
            valid = torch.arange(n * c, device=q.device).view(n, 1, c) < T
            mask = valid.expand(n, c, c)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal)
        return y.reshape(B, H, n * c, hs)[:, :, :T]

    def _explicit(self, q, k, v, q_start: int, causal: bool, p: float):
        """Materialised softmax attention, used only when attention maps are logged."""
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, nh, Tq, Tk)
        mask = attention_mask(q_start, q.shape[2], k.shape[2], causal=causal, chunk_size=self.chunk_size,
                              device=q.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.softmax(dim=-1)
        y = F.dropout(weights, p=p, training=p > 0) @ v
        return y, weights
