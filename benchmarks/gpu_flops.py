"""Training FLOPs of a BitTransformerLM step and the dense bf16 peak of the accelerator, for MFU."""

from __future__ import annotations

from typing import Optional

from torch import nn

# Dense (no 2:4 sparsity) bf16 tensor-core peaks from the vendors' data sheets, in FLOP/s. Matched
# as substrings of torch.cuda.get_device_name, first match wins, so the PCIe H100 comes before "H100".
DENSE_BF16_PEAK: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM; the H100 NVL reports its own name and is not listed
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
)


def dense_bf16_peak(device_name: str, override_tflops: Optional[float] = None) -> Optional[float]:
    """Peak FLOP/s of `device_name`, the override (in TFLOP/s) when given, None when unknown (a CPU)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    for key, peak in DENSE_BF16_PEAK:
        if key in device_name:
            return peak
    return None


def train_flops_per_row(model: nn.Module, context_bytes: int) -> dict[str, float]:
    """Forward + backward FLOPs of one (context_bytes,) training row, by part.

    Every nn.Linear runs once per transformer position (a bit for the flat bit model, a byte for
    the byte baseline and the patched model's encoder, stack and to_local): 6 FLOPs per weight per
    position, 2 forward and 4 backward. Attention's score and value matmuls add 12 n_layers d_model T
    per position (T positions in the row, the usual non-causal count, as in the PaLM paper's MFU).
    The patched model's local decoder scores every bit as a dot product of local_d_ff features with
    a tree node's vector: 6 local_d_ff FLOPs per bit (d_model with local_d_ff=0; per pattern of the
    byte with model.byte_softmax, whose tree masses are then sums over that joint; the training readout
    scores all nodes of phases 0-7 at once, more arithmetic than the model needs, uncounted like
    recomputation). Embedding lookups and element-wise work are not
    counted; the reversible stack's recomputation is not either (MFU counts the model's FLOPs).
    """
    cfg = model.config
    n_positions = context_bytes * cfg.positions_per_byte + (1 if cfg.arch == "patched" else 0)  # + BOS
    linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    parts = {"linear": 6.0 * linear_weights * n_positions,
             "attention": 12.0 * cfg.n_layers * cfg.d_model * n_positions * n_positions,
             "local_decoder": 0.0}
    if cfg.arch == "patched" and cfg.representation == "bit":
        # model.byte_softmax scores every pattern of the byte (2^bpb of them, the 2^8 data patterns with
        # model.known_parity) instead of bpb tree nodes
        patterns = model.body.pattern_vectors
        scored = patterns.num_embeddings if patterns is not None else cfg.bits_per_byte
        parts["local_decoder"] = 6.0 * (cfg.local_d_ff or cfg.d_model) * scored * context_bytes
    return parts
