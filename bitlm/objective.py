"""The causal language-modelling loss and its bits-per-byte accounting, for every representation.

bpb = total negative log2-likelihood of all bits of the scored bytes (parity bits included)
divided by the number of scored bytes. Every byte of a window is scored except the first: the
bit model's first byte has no earlier bits to condition on, and skipping it for both the bit
and the byte model means both are scored on exactly the same bytes with the same context.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import telemetry as tm
from .codec import bytes_to_bit_tensor, bytes_to_bits
from .compression import compress_batch
from .modes import eval_mode

LN2 = math.log(2.0)


@dataclass
class LossOutput:
    loss: torch.Tensor  # mean cross-entropy (nats per predicted position), what is backpropagated
    nll_bits: torch.Tensor  # summed negative log2-likelihood of the scored bytes (detached)
    n_bytes: int  # scored bytes
    # predicted P(bit=1), (B, n) with column 0 at bit phase 0 of a byte: what the K/C/S proxies read
    p_one: Optional[torch.Tensor] = None


def model_inputs(model, byte_windows: torch.Tensor) -> torch.Tensor:
    """The id sequence a model (or ModelConfig) reads for (B, L) byte windows: bits (B, L*bpb) or the bytes."""
    cfg = getattr(model, "config", model)
    if cfg.representation == "bit":
        return bytes_to_bit_tensor(byte_windows, parity=cfg.parity)
    return byte_windows.long()


def scored_inputs(cfg, ids: torch.Tensor) -> torch.Tensor:
    """What a model reads of (B, T) ids for causal_loss, which scores the logits of positions 0 .. T-2.

    The last position predicts past the window. A patched model is given the window without its last
    bit, which keeps the last byte out of its stack: BOS and L - 1 bytes, L positions as in the byte
    model, instead of L + 1 (the same logits; 2.8% less forward and backward time at `small`, 128 x 8,
    benchmarks/bench_scored_inputs.py). The flat models read the whole window: there one position fewer
    (127 instead of 128) took 2.9% more time on this CPU, not less.
    """
    return ids[:, :-1] if cfg.arch == "patched" else ids


def scored_logits(net, ids: torch.Tensor, cfg) -> torch.Tensor:
    """The causal logits causal_loss reads for (B, T) ids: `net` (the model, or its DDP/FSDP wrapper, whose
    ModelConfig is `cfg`) on scored_inputs."""
    return net(scored_inputs(cfg, ids), causal=True)[0]


def causal_loss(logits: torch.Tensor, ids: torch.Tensor, cfg) -> LossOutput:
    """Next-position cross-entropy of (B, T, V) logits (or their first T - 1) for (B, T) ids, with the bpb
    numerator and denominator.

    `cfg` is the model's ModelConfig (it says how many ids make a byte).
    """
    T = ids.shape[1]
    per_position = F.cross_entropy(
        logits[:, :T - 1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(ids.shape[0], -1)  # (B, T-1): entry t is the loss of position t+1
    first_scored = cfg.ids_per_byte - 1  # first id of byte 1, minus the shift
    nll_bits = per_position[:, first_scored:].detach().sum() / LN2
    n_bytes = ids.shape[0] * (ids.shape[1] // cfg.ids_per_byte - 1)
    p_one = None
    if cfg.representation == "bit":  # logits[:, t] predicts bit t + 1: start at byte 1's first bit
        p_one = logits[:, first_scored:T - 1].float().softmax(-1)[..., 1]
    return LossOutput(loss=per_position.mean(), nll_bits=nll_bits, n_bytes=n_bytes, p_one=p_one)


def batch_loss(model, byte_windows: torch.Tensor) -> LossOutput:
    """causal_loss of a plain model on a (B, L) uint8 batch: the model's forward, then the loss."""
    ids = model_inputs(model, byte_windows.to(next(model.parameters()).device))
    return causal_loss(scored_logits(model, ids, model.config), ids, model.config)


def telemetry_penalty(out: LossOutput, reference: torch.Tensor, bits_per_byte: int, *, lambda_k: float,
                      lambda_c: float, lambda_s: float) -> Optional[torch.Tensor]:
    """sum of lambda * (1 - metric) over the differentiable K, C and S proxies, or None when all are off."""
    if out.p_one is None or not (lambda_k or lambda_c or lambda_s):
        return None
    p = out.p_one
    penalty = p.new_zeros(())
    if lambda_k:
        penalty = penalty + lambda_k * (1.0 - tm.negentropy(p)).mean()
    if lambda_c:
        penalty = penalty + lambda_c * (1.0 - tm.lz_complexity_proxy(p)).mean()
    if lambda_s:
        penalty = penalty + lambda_s * (1.0 - tm.symbiosis_proxy(p, reference, bits_per_byte)).mean()
    return penalty


@torch.no_grad()
def bits_per_byte_over(model, batches, loss_fn) -> tuple[float, int]:
    """Total bits over total scored bytes of `loss_fn(model, batch)` across batches, in eval mode.

    A loss_fn may return None for a batch this rank does not score (a pipeline's earlier stages);
    such a rank returns (nan, 0).
    """
    total_bits, total_bytes, n_batches, n_scored = 0.0, 0, 0, 0
    with eval_mode(model):
        for batch in batches:
            n_batches += 1
            out = loss_fn(model, batch)
            if out is None:
                continue
            n_scored += 1
            total_bits += float(out.nll_bits)
            total_bytes += out.n_bytes
    if n_batches and not n_scored:
        return math.nan, 0
    if total_bytes == 0:
        raise ValueError("no bytes to score (empty validation set?)")
    return total_bits / total_bytes, total_bytes


def evaluate_bpb(model, batches, *, autocast=None, logits_of=None) -> dict[str, float]:
    """Bits per byte of a model over an iterable of (B, L) byte batches.

    logits_of(ids): the causal logits, or None on a rank that does not have them (default: the model's forward).
    """
    device = next(model.parameters()).device
    logits_of = logits_of or (lambda ids: scored_logits(model, ids, model.config))

    def loss_fn(m, batch):
        ids = model_inputs(m, batch.to(device))
        with autocast() if autocast is not None else contextlib.nullcontext():
            logits = logits_of(ids)
            return None if logits is None else causal_loss(logits, ids, m.config)

    bpb, n_bytes = bits_per_byte_over(model, batches, loss_fn)
    return {"bpb": bpb, "n_bytes": n_bytes}


COMPRESSED_STREAM = 1  # stream id of rows that carry RLE-compressed bits


def compressed_rows(byte_windows: torch.Tensor, parity: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """RLE-compress each (B, L) row's bits and fit the streams to the rows' bit length.

    Returns ids (B, T), a mask (B, T-1) of the next-bit targets that are real stream bits (a stream
    shorter than T is padded; one longer is cut), and the mean compressed/original size ratio.
    """
    rows = np.stack([bytes_to_bits(row.tobytes(), parity=parity) for row in byte_windows.cpu().numpy()])
    T = rows.shape[1]
    streams = compress_batch(rows)
    ids = np.zeros((len(streams), T), dtype=np.int64)
    lengths = np.array([min(len(s), T) for s in streams])
    for i, stream in enumerate(streams):
        ids[i, :lengths[i]] = stream[:T]
    mask = np.arange(T - 1)[None, :] < (lengths[:, None] - 1)
    ratio = float(np.mean([len(s) / T for s in streams]))
    return torch.from_numpy(ids), torch.from_numpy(mask), ratio


def stream_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-bit cross-entropy (nats) over the masked targets of (B, T, 2) logits of another stream's ids."""
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, 2), ids[:, 1:].reshape(-1), reduction="none")
    return (ce.view_as(mask) * mask).sum() / mask.sum().clamp_min(1)
