"""The safety gate's error rates on benchmarks/bench_gate.py's three probe sets, for the telemetry search.

The gate decides on C and S of the text alone (K is reported, never gated), so its rates depend on
its settings and on the corpus' reference marginals, not on the trained weights. Every probe is a
stream of `windows_per_stream` windows fed to the gate one window at a time, so the EMA decay and
the burn-in matter: a stream counts as blocked when any of its windows is.

- held-out text: consecutive windows of the corpus' validation split (false-block rate);
- repetition loops: a validation phrase of 5-60 bytes repeated (miss rate);
- random bytes (miss rate).
"""

from __future__ import annotations

import numpy as np

from bitlm.codec import bytes_to_bits
from bitlm.safety import SafetyConfig, SafetyGate
from bitlm.telemetry import complexity_and_symbiosis

WINDOWS_PER_STREAM = 4


def _streams(text: bytes, stream_bytes: int, n: int) -> list[bytes]:
    """Up to `n` non-overlapping slices of `stream_bytes` (one shorter slice when the text is short)."""
    slices = [text[i:i + stream_bytes] for i in range(0, len(text) - stream_bytes + 1, stream_bytes)][:n]
    return slices or [text]


def _loops(text: bytes, stream_bytes: int, n: int, rng: np.random.Generator) -> list[bytes]:
    loops = []
    for length in rng.integers(5, 61, n):
        length = int(min(length, max(len(text) - 1, 1)))
        start = int(rng.integers(0, max(len(text) - length, 1)))
        phrase = text[start:start + length] or b"a"
        loops.append((phrase * (stream_bytes // len(phrase) + 1))[:stream_bytes])
    return loops


def _blocked(gate: SafetyGate, stream: bytes, reference: np.ndarray, bits_per_byte: int, name: str) -> bool:
    window = gate.config.window_bytes
    blocked = False
    for start in range(0, max(len(stream) - window + 1, 1), window):
        piece = stream[start:start + window]
        c, s = complexity_and_symbiosis(bytes_to_bits(piece, parity=bits_per_byte == 9), reference, bits_per_byte,
                                        window)
        blocked |= not gate.observe(None, c, s, stream=name).passed
    return blocked


def gate_error_rates(val_text: bytes, reference: np.ndarray, safety: SafetyConfig, *, parity: bool = True,
                     n_probes: int = 32, seed: int = 0) -> dict[str, float]:
    """`gate/false_block_rate`, `gate/loop_miss_rate`, `gate/random_miss_rate` (fractions of probe streams)."""
    bits_per_byte = 9 if parity else 8
    stream_bytes = WINDOWS_PER_STREAM * safety.window_bytes
    rng = np.random.default_rng(seed)
    gate = SafetyGate(safety)
    held_out = _streams(val_text, stream_bytes, n_probes)
    loops = _loops(val_text, stream_bytes, n_probes, rng)
    noise = [rng.integers(0, 256, stream_bytes).astype(np.uint8).tobytes() for _ in range(n_probes)]

    def rate(streams: list[bytes], case: str) -> float:
        return sum(_blocked(gate, s, reference, bits_per_byte, f"{case}-{i}") for i, s in enumerate(streams)) / len(streams)

    return {"gate/false_block_rate": rate(held_out, "held-out"),
            "gate/loop_miss_rate": 1.0 - rate(loops, "loop"),
            "gate/random_miss_rate": 1.0 - rate(noise, "random"),
            "gate/n_probes": float(len(held_out) + len(loops) + len(noise))}
