"""Block rates of the safety gate (default floors) on held-out Shakespeare, repetition loops and random bytes.

The gate decides on C and S only; K (the model's negentropy) is reported but never gated, so no
model is needed here: C and S are computed from the bits with the gate's own windowing, against
reference marginals of the first 90% of tinyshakespeare, and fed to a SafetyGate without EMA or
burn-in. Run from benchmarks/: python bench_gate.py [--out results/gate.jsonl]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import numpy as np
from common import emit, load_shakespeare

from bitlm.codec import bytes_to_bits
from bitlm.data import bit_marginals
from bitlm.safety import SafetyGate
from bitlm.telemetry import complexity_and_symbiosis

WINDOW_BYTES = 512


def held_out_windows(data: bytes, train_fraction: float) -> list[bytes]:
    """Every non-overlapping 512-byte window of the held-out tail."""
    tail = data[int(len(data) * train_fraction):]
    return [tail[i:i + WINDOW_BYTES] for i in range(0, len(tail) - WINDOW_BYTES + 1, WINDOW_BYTES)]


def repetition_loops(data: bytes, train_fraction: float, n: int, rng: np.random.Generator) -> list[tuple[int, bytes]]:
    """(phrase length, loop) pairs: a held-out phrase of 5-60 bytes repeated to 512 bytes."""
    tail = data[int(len(data) * train_fraction):]
    loops = []
    for length in rng.integers(5, 61, n):
        start = int(rng.integers(0, len(tail) - length))
        phrase = tail[start:start + length]
        loops.append((int(length), (phrase * (WINDOW_BYTES // length + 1))[:WINDOW_BYTES]))
    return loops


def judge(samples: list[bytes], gate: SafetyGate, reference: np.ndarray, case: str) -> tuple[list[bool], np.ndarray]:
    """Gate every sample (each on a fresh stream); returns the pass flags and a (n, 2) array of C, S."""
    passed, values = [], []
    for i, sample in enumerate(samples):
        c, s = complexity_and_symbiosis(bytes_to_bits(sample), reference, 9, WINDOW_BYTES)
        passed.append(gate.observe(None, c, s, stream=f"{case}-{i}").passed)
        values.append((c, s))
    return passed, np.array(values)


def summary(case: str, passed: list[bool], values: np.ndarray, want_blocked: bool) -> dict:
    n_blocked = len(passed) - sum(passed)
    c, s = values[:, 0], values[:, 1]
    return {"bench": "gate", "case": case, "n": len(passed), "n_blocked": n_blocked,
            "block_rate": round(n_blocked / len(passed), 4), "target": ">= 0.99 blocked" if want_blocked
            else ">= 0.99 passed", "C_min": round(float(c.min()), 4), "C_max": round(float(c.max()), 4),
            "S_min": round(float(s.min()), 4), "S_max": round(float(s.max()), 4)}


def main(argv: list[str] | None = None) -> list[dict]:
    """Measure the gate's block rates and print one JSON line per case."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="loops and random strings each (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="append the results to this file as JSON lines")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be >= 1")

    data = load_shakespeare()
    train_fraction = 0.9
    reference = bit_marginals(np.frombuffer(data[:int(len(data) * train_fraction)], dtype=np.uint8), parity=True)
    gate = SafetyGate(decay=0.0, burn_in=0)  # default floors C >= 0.3, S >= 0.5
    rng = np.random.default_rng(args.seed)
    base = {"floors": {"c": gate.config.c_floor, "s": gate.config.s_floor}, "window_bytes": WINDOW_BYTES,
            "seed": args.seed}
    results = []

    start = time.perf_counter()
    passed, values = judge(held_out_windows(data, train_fraction), gate, reference, "held_out")
    record = summary("held_out_shakespeare", passed, values, want_blocked=False)
    record["false_blocks_C"] = int(np.sum(values[:, 0] < gate.config.c_floor))
    record["false_blocks_S"] = int(np.sum(values[:, 1] < gate.config.s_floor))
    results.append(record)

    loops = repetition_loops(data, train_fraction, args.n, rng)
    passed, values = judge([loop for _, loop in loops], gate, reference, "loop")
    record = summary("repetition_loops", passed, values, want_blocked=True)
    escaped = Counter(length for (length, _), ok in zip(loops, passed) if ok)
    record["phrase_bytes"] = [5, 60]
    record["escaped_by_phrase_bytes"] = {str(k): v for k, v in sorted(escaped.items())}
    lengths = np.array([length for length, _ in loops])
    buckets = {}
    for lo in range(5, 61, 10):
        in_bucket = (lengths >= lo) & (lengths <= lo + 9)
        buckets[f"{lo:02d}-{min(lo + 9, 60):02d}"] = round(float(values[in_bucket, 0].max(initial=0.0)), 4)
    record["C_max_by_phrase_bytes"] = buckets
    results.append(record)

    strings = [rng.integers(0, 256, WINDOW_BYTES).astype(np.uint8).tobytes() for _ in range(args.n)]
    passed, values = judge(strings, gate, reference, "random")
    results.append(summary("random_bytes", passed, values, want_blocked=True))

    elapsed = round(time.perf_counter() - start, 2)
    for record in results:
        emit(base | record | {"seconds_total": elapsed}, args.out)
    return results


if __name__ == "__main__":
    main()
