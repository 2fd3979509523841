"""Scoring a whole text: bits per byte over sliding windows, and K/C/S over fixed-size windows."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import telemetry as tm
from .codec import bytes_to_bits
from .objective import LN2
from .sampling import infer_long_sequence

TELEMETRY_WINDOW_BYTES = 512  # the window the K/C/S calibration in DESIGN.md was measured on


@torch.no_grad()
def evaluate_text(model, data: bytes, *, overlap_bytes: int | None = None) -> dict[str, float]:
    """bpb of `data` under the model (every byte but the first is scored) and mean K, C, S."""
    cfg = model.config
    if len(data) < 2:
        raise ValueError(f"evaluate_text: need at least 2 bytes of text, got {len(data)}")
    if cfg.representation == "bit":
        ids = torch.as_tensor(bytes_to_bits(data, parity=cfg.parity), dtype=torch.long)
    else:
        ids = torch.as_tensor(np.frombuffer(data, dtype=np.uint8).astype(np.int64))
    ppb = cfg.ids_per_byte
    overlap = None if overlap_bytes is None else overlap_bytes * ppb
    logits = infer_long_sequence(model, ids, overlap=overlap)  # (T, V)
    targets = ids[1:].to(logits.device)
    nll = F.cross_entropy(logits[:-1].float(), targets, reduction="none")  # entry t: loss of position t+1
    nll_bits = float(nll[ppb - 1:].sum()) / LN2
    n_bytes = len(data) - 1

    if cfg.representation == "bit":
        p_one = logits.float().softmax(-1)[:, 1]
        negentropy = float(tm.negentropy(p_one[None])[0])
    else:
        probs = logits.float().softmax(-1)
        negentropy = float(1.0 - (-(probs * probs.clamp_min(1e-12).log2()).sum(-1)).mean() / 8.0)
    bits = bytes_to_bits(data, parity=cfg.parity)
    span = TELEMETRY_WINDOW_BYTES * cfg.bits_per_byte
    n_windows = max(1, len(bits) // span)
    windows = bits[: n_windows * span].reshape(n_windows, -1) if len(bits) >= span else bits[None]
    reference = model.reference_marginals.cpu().numpy()
    return {
        "bpb": nll_bits / n_bytes,
        "n_bytes": n_bytes,
        "K": negentropy,
        "C": float(np.mean(tm.lz_complexity_batch(windows))),
        "S": float(np.mean(tm.symbiosis(windows, reference, cfg.bits_per_byte))),
    }
