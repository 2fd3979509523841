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

import torch
import torch.nn.functional as F

from . import telemetry as tm
from .codec import bytes_to_bit_tensor

LN2 = math.log(2.0)


@dataclass
class LossOutput:
    loss: torch.Tensor  # mean cross-entropy (nats per predicted position), what is backpropagated
    nll_bits: torch.Tensor  # summed negative log2-likelihood of the scored bytes (detached)
    n_bytes: int  # scored bytes
    # predicted P(bit=1), (B, n) with column 0 at bit phase 0 of a byte: what the K/C/S proxies read
    p_one: Optional[torch.Tensor] = None


def model_inputs(model, byte_windows: torch.Tensor) -> torch.Tensor:
    """The id sequence a model reads for (B, L) byte windows: bits (B, L*bpb) or the bytes themselves."""
    if model.config.representation == "bit":
        return bytes_to_bit_tensor(byte_windows, parity=model.config.parity)
    return byte_windows.long()


def causal_loss(model, byte_windows: torch.Tensor) -> LossOutput:
    """Next-position cross-entropy on a (B, L) uint8 batch, with the bpb numerator and denominator."""
    ids = model_inputs(model, byte_windows.to(_device_of(model)))
    logits, _ = model(ids, causal=True)
    per_position = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(ids.shape[0], -1)  # (B, T-1): entry t is the loss of position t+1
    first_scored = model.config.ids_per_byte - 1  # first id of byte 1, minus the shift
    nll_bits = per_position[:, first_scored:].detach().sum() / LN2
    n_bytes = byte_windows.shape[0] * (byte_windows.shape[1] - 1)
    p_one = None
    if model.config.representation == "bit":  # logits[:, t] predicts bit t + 1: start at byte 1's first bit
        p_one = logits[:, first_scored:-1].float().softmax(-1)[..., 1]
    return LossOutput(loss=per_position.mean(), nll_bits=nll_bits, n_bytes=n_bytes, p_one=p_one)


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
def evaluate_bpb(model, batches, *, autocast=None) -> dict[str, float]:
    """Bits per byte of a model over an iterable of (B, L) byte batches."""
    was_training = model.training
    model.eval()
    total_bits, total_bytes = 0.0, 0
    try:
        for batch in batches:
            with autocast() if autocast is not None else contextlib.nullcontext():
                out = causal_loss(model, batch)
            total_bits += float(out.nll_bits)
            total_bytes += out.n_bytes
    finally:
        model.train(was_training)
    if total_bytes == 0:
        raise ValueError("evaluate_bpb: no bytes to score (empty validation set?)")
    return {"bpb": total_bits / total_bytes, "n_bytes": total_bytes}


def _device_of(model) -> torch.device:
    return next(model.parameters()).device

