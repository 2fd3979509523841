"""Run-length coding speed and ratio: the vectorised batch encoder/decoder vs a pure-Python loop, text and random bits.

Run from benchmarks/: ``python bench_rle.py [--n-bits N] [--rows R] [--out PATH]``. The text source is
the MSB-first bits (with parity, the codec's default) of tinyshakespeare; the random source is
uniform bits from a fixed seed. Both are cut to ``rows`` rows of ``n_bits // rows`` bits.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bitlm.codec import bytes_to_bits
from bitlm.compression import compress_batch, compression_ratio, decompress_batch
from common import best_seconds, emit, load_shakespeare


def python_compress(bits: list[int]) -> list[int]:
    """The stream format written with plain Python loops over bits and runs."""
    runs: list[int] = []
    prev = None
    for b in bits:
        if b == prev:
            runs[-1] += 1
        else:
            runs.append(1)
            prev = b
    out = [bits[0] if bits else 0]
    for value in [len(runs) + 1] + runs:
        m = value.bit_length()
        out.extend([0] * (m - 1))
        out.extend((value >> k) & 1 for k in range(m - 1, -1, -1))
    return out


def python_decompress(stream: list[int]) -> list[int]:
    """Inverse of python_compress for valid streams, one bit at a time."""
    pos = 1

    def gamma() -> int:
        nonlocal pos
        zeros = 0
        while stream[pos] == 0:
            zeros += 1
            pos += 1
        value = 0
        for _ in range(zeros + 1):
            value = (value << 1) | stream[pos]
            pos += 1
        return value

    bit, out = stream[0], []
    for _ in range(gamma() - 1):
        out.extend([bit] * gamma())
        bit ^= 1
    return out


def measure(source: str, batch: np.ndarray, repeats: int) -> dict:
    """Time both encoders and decoders on ``batch`` (rows, bits), checking they agree bit for bit."""
    streams = compress_batch(batch)
    rows = batch.tolist()
    start = time.perf_counter()
    py_streams = [python_compress(row) for row in rows]
    py_encode = time.perf_counter() - start
    for r, (fast, slow) in enumerate(zip(streams, py_streams)):
        assert fast.tolist() == slow, f"{source}: encoders disagree on row {r}"

    start = time.perf_counter()
    py_decoded = [python_decompress(stream) for stream in py_streams]
    py_decode = time.perf_counter() - start
    decoded = decompress_batch(streams)
    assert [row.tolist() for row in decoded] == py_decoded == rows, f"{source}: decoding does not round-trip"

    encode = best_seconds(lambda: compress_batch(batch), repeats)
    decode = best_seconds(lambda: decompress_batch(streams), repeats)
    n_bits = batch.size
    compressed = sum(stream.size for stream in streams)
    return {
        "bench": "rle",
        "source": source,
        "n_bits": n_bits,
        "rows": batch.shape[0],
        "runs": int(np.count_nonzero(batch[:, 1:] != batch[:, :-1]) + batch.shape[0]),
        "compressed_bits": compressed,
        "ratio": round(compression_ratio(n_bits, compressed), 5),
        "encode_s": round(encode, 5),
        "python_encode_s": round(py_encode, 4),
        "encode_speedup": round(py_encode / encode, 1),
        "encode_mbit_per_s": round(n_bits / encode / 1e6, 2),
        "decode_s": round(decode, 5),
        "python_decode_s": round(py_decode, 4),
        "decode_speedup": round(py_decode / decode, 1),
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    """Measure on tinyshakespeare bits and on random bits; print (and append) one JSON line per source."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-bits", type=int, default=1_000_000, help="bits per source (default 1_000_000)")
    parser.add_argument("--rows", type=int, default=16, help="batch rows the bits are split into (default 16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of the vectorised code; best kept")
    parser.add_argument("--out", type=Path, help="append the results to this file as JSON lines")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.n_bits < args.rows or args.repeats < 1:
        parser.error("need --rows >= 1, --n-bits >= --rows and --repeats >= 1")
    width = args.n_bits // args.rows

    text_bits = bytes_to_bits(load_shakespeare())
    reps = -(-args.rows * width // text_bits.size)
    sources = {
        "tinyshakespeare": np.tile(text_bits, reps)[: args.rows * width].reshape(args.rows, width),
        "uniform-random": np.random.default_rng(0).integers(0, 2, (args.rows, width), dtype=np.uint8),
    }
    results = []
    for source, batch in sources.items():
        record = measure(source, batch, args.repeats)
        emit(record, args.out)
        results.append(record)
    return results


if __name__ == "__main__":
    main()
