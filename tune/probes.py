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


def probe_telemetry(val_text: bytes, reference: np.ndarray, *, window_bytes: int = 512, parity: bool = True,
                    n_probes: int = 32, seed: int = 0) -> dict[str, list[list[tuple[float, float]]]]:
    """(C, S) of every window of every probe stream, per probe set: computed once, scored for any gate settings."""
    bits_per_byte = 9 if parity else 8
    stream_bytes = WINDOWS_PER_STREAM * window_bytes
    rng = np.random.default_rng(seed)
    sets = {"held-out": _streams(val_text, stream_bytes, n_probes),
            "loop": _loops(val_text, stream_bytes, n_probes, rng),
            "random": [rng.integers(0, 256, stream_bytes).astype(np.uint8).tobytes() for _ in range(n_probes)]}

    def windows(stream: bytes) -> list[tuple[float, float]]:
        pieces = [stream[i:i + window_bytes] for i in range(0, max(len(stream) - window_bytes + 1, 1), window_bytes)]
        return [tuple(float(v) for v in complexity_and_symbiosis(bytes_to_bits(piece, parity=parity), reference,
                                                                bits_per_byte, window_bytes)) for piece in pieces]

    return {case: [windows(stream) for stream in streams] for case, streams in sets.items()}


def error_rates(telemetry: dict[str, list[list[tuple[float, float]]]], safety: SafetyConfig) -> dict[str, float]:
    """The gate's error rates on probe telemetry: a stream counts as blocked when any of its windows is."""
    gate = SafetyGate(safety)

    def blocked_fraction(case: str) -> float:
        streams = telemetry[case]
        blocked = [any([not gate.observe(None, c, s, stream=f"{case}-{i}").passed for c, s in windows])
                   for i, windows in enumerate(streams)]
        return sum(blocked) / len(streams)

    return {"gate/false_block_rate": blocked_fraction("held-out"),
            "gate/loop_miss_rate": 1.0 - blocked_fraction("loop"),
            "gate/random_miss_rate": 1.0 - blocked_fraction("random"),
            "gate/n_probes": float(sum(len(streams) for streams in telemetry.values()))}


def gate_error_rates(val_text: bytes, reference: np.ndarray, safety: SafetyConfig, *, parity: bool = True,
                     n_probes: int = 32, seed: int = 0) -> dict[str, float]:
    """`gate/false_block_rate`, `gate/loop_miss_rate`, `gate/random_miss_rate` (fractions of probe streams)."""
    telemetry = probe_telemetry(val_text, reference, window_bytes=safety.window_bytes, parity=parity,
                                n_probes=n_probes, seed=seed)
    return error_rates(telemetry, safety)
