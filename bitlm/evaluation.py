"""Scoring: bpb of a whole text over sliding windows, K/C/S of a text and of what a model predicts for a batch."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import telemetry as tm
from .codec import bit_table, bytes_to_bit_tensor, bytes_to_bits
from .diffusion import evaluate_elbo, mask_exactly
from .model import MASK
from .modes import eval_mode
from .objective import LN2, model_inputs
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


@torch.no_grad()
def prediction_telemetry(model, byte_batch: torch.Tensor, *, seed: int = 0, logits_of=None) -> Optional[dict[str, float]]:
    """Mean K, C and S of what the model predicts for a (B, L) byte batch, teacher-forced (eval mode).

    Causal: the prediction of every bit of bytes 1..L-1 (the bits bpb scores) from the bits before
    it; C is the LZ complexity of the argmax bits, S compares the mean predicted P(bit=1) per byte
    phase with the reference marginals. The byte baseline's bit probabilities are sums of its
    256-way distribution (its K stays the byte entropy / 8). Diffusion: half of the bits (bytes,
    patched) masked by a mask seeded with `seed`; K and S read the masked positions, C the bits
    with the masked ones replaced by the argmax. logits_of(ids): a causal model's logits (default
    its forward); None from it (a pipeline rank without logits) makes the result None.
    """
    with eval_mode(model):
        ids = model_inputs(model, byte_batch.to(next(model.parameters()).device))
        if not model.config.causal:
            return _diffusion_prediction_telemetry(model, ids, seed)
        logits = logits_of(ids) if logits_of is not None else model(ids)[0]
        return None if logits is None else causal_prediction_telemetry(model, ids, logits)


def causal_prediction_telemetry(model, ids: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """prediction_telemetry of a causal model from its input ids (B, T) and the logits (B, T, V) it gave for them."""
    cfg = model.config
    bpb = cfg.bits_per_byte
    if cfg.representation == "bit":
        scored = logits[:, bpb - 1:-1].float()  # logits[:, t] predicts bit t + 1: from byte 1's first bit
        p_one, predicted = scored.softmax(-1)[..., 1], scored.argmax(-1)
        k = None
    else:
        probs = logits[:, :-1].float().softmax(-1)  # (B, L-1, 256): bytes 1..L-1
        table = bit_table(cfg.parity, probs.device).to(probs.dtype)  # (256, bpb)
        p_one = (probs @ table).flatten(1)  # P(bit=1) = the mass of the bytes with that bit set
        predicted = table[probs.argmax(-1)].flatten(1).long()
        k = float(tm.byte_negentropy(probs).mean())
    tel = tm.prediction_summary(p_one, predicted, model.reference_marginals, bpb)
    return _means(tel) | ({} if k is None else {"K": k})


def _diffusion_prediction_telemetry(model, ids: torch.Tensor, seed: int) -> dict[str, float]:
    cfg = model.config
    bpb, byte_level = cfg.bits_per_byte, cfg.arch == "patched"
    n_units = ids.shape[1] // bpb if byte_level else ids.shape[1]
    counts = torch.full((ids.shape[0],), max(1, n_units // 2))
    masked = mask_exactly(counts, n_units, torch.Generator().manual_seed(seed)).to(ids.device)
    if byte_level:
        masked = masked.repeat_interleave(bpb, dim=1)
    logits, _ = model(torch.where(masked, torch.full_like(ids, MASK), ids), causal=False,
                      **({"local_prefix": ids} if byte_level else {}))
    p_one = logits.float().softmax(-1)[..., 1]
    predicted = torch.where(masked, logits.argmax(-1), ids)
    return _means(tm.prediction_summary(p_one, predicted, model.reference_marginals, bpb, weight=masked))


def data_telemetry(model, byte_batch: torch.Tensor) -> dict[str, float]:
    """Mean C and S of the bits prediction_telemetry predicts, read from the batch itself: the data's reference."""
    cfg = model.config
    scored = byte_batch if not cfg.causal else byte_batch[:, 1:]  # causal: byte 0 is not predicted
    bits = bytes_to_bit_tensor(scored.cpu(), parity=cfg.parity).numpy()
    reference = model.reference_marginals.cpu().numpy()
    return {"C": float(tm.lz_complexity_batch(bits).mean()),
            "S": float(np.mean(tm.symbiosis(bits, reference, cfg.bits_per_byte)))}


def _means(tel: dict[str, torch.Tensor]) -> dict[str, float]:
    return {"K": float(tel["negentropy"].mean()), "C": float(tel["lz_complexity"].mean()),
            "S": float(tel["symbiosis"].mean())}


def format_telemetry(metrics: dict) -> str:
    """'K .. C .. S ..' of the model's predictions, with the data's own C and S when the metrics carry them."""
    text = f"K {metrics['val/K']:.3f}  C {metrics['val/C']:.3f}  S {metrics['val/S']:.3f}"
    if "data/C" in metrics and "data/S" in metrics:
        text += f"  (data: C {metrics['data/C']:.3f}  S {metrics['data/S']:.3f})"
    return text
