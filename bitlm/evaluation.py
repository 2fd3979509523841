"""Scoring a whole text: bits per byte over sliding windows, and K/C/S over fixed-size windows."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import telemetry as tm
from .codec import bytes_to_bits
from .diffusion import evaluate_elbo
from .objective import LN2
from .sampling import infer_long_sequence

TELEMETRY_WINDOW_BYTES = 512  # the window the K/C/S calibration in DESIGN.md was measured on


@torch.no_grad()
def evaluate_text(model, data: bytes, *, overlap_bytes: int | None = None,
                  noise_schedule: str = "cosine") -> dict[str, float]:
    """bpb of `data` under the model (every byte but the first is scored) and mean K, C, S.

    A non-causal (diffusion) model is scored by its ELBO instead (key "elbo_bpb", an upper bound)
    over consecutive windows of its context; a tail shorter than a window is dropped.
    """
    cfg = model.config
    if len(data) < 2:
        raise ValueError(f"evaluate_text: need at least 2 bytes of text, got {len(data)}")
    if not cfg.causal:
        return _evaluate_diffusion_text(model, data, noise_schedule) | _telemetry_of_text(model, data)
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

    return {"bpb": nll_bits / n_bytes, "n_bytes": n_bytes} | _telemetry_of_text(model, data, logits)


def _evaluate_diffusion_text(model, data: bytes, noise_schedule: str) -> dict[str, float]:
    window = model.config.max_input_ids // model.config.bits_per_byte
    usable = max(len(data) // window * window, min(len(data), window))
    windows = torch.as_tensor(np.frombuffer(data[:usable], dtype=np.uint8).copy()).view(-1, min(window, usable))
    result = evaluate_elbo(model, windows.split(16), schedule=noise_schedule)
    return {"elbo_bpb": result["elbo_bpb"], "n_bytes": result["n_bytes"]}


def _telemetry_of_text(model, data: bytes, logits: torch.Tensor | None = None) -> dict[str, float]:
    """K from the model's predictions (given, or on the first context of the text), C and S over windows."""
    cfg = model.config
    if logits is None:
        ids = torch.as_tensor(bytes_to_bits(data, parity=cfg.parity)[: cfg.max_input_ids], dtype=torch.long)
        ids = ids[: len(ids) // cfg.bits_per_byte * cfg.bits_per_byte]
        logits = model(ids[None].to(next(model.parameters()).device))[0][0]
    if cfg.representation == "bit":
        negentropy = float(tm.negentropy(logits.float().softmax(-1)[None, :, 1])[0])
    else:
        negentropy = float(tm.byte_negentropy(logits.softmax(-1)))
    # the same windows the safety gate judges, so eval's C and S are the gate's numbers
    c, s = tm.complexity_and_symbiosis(bytes_to_bits(data, parity=cfg.parity), model.reference_marginals.cpu().numpy(),
                                       cfg.bits_per_byte, TELEMETRY_WINDOW_BYTES)
    return {"K": negentropy, "C": c, "S": s}
