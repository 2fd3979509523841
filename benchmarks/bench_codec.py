"""Throughput of the bit codec (text_to_bits, bits_to_text) in MB of text per second."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

from bitlm.codec import bits_to_text, text_to_bits

from common import best_seconds

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def load_text(n_bytes: int) -> tuple[str, str]:
    """Return (text of about n_bytes UTF-8 bytes, source name): tinyshakespeare repeated, else generated ASCII."""
    if CORPUS.is_file():
        base, source = CORPUS.read_text(encoding="utf-8"), "tinyshakespeare"
    else:
        base = "".join(chr(32 + (i * 7919) % 95) for i in range(1 << 16)) + "\n"
        source = "generated-ascii"
    reps = -(-n_bytes // len(base.encode("utf-8")))
    return (base * reps)[:n_bytes], source


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the codec benchmarks and print one JSON object per measurement."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=float, default=8.0, help="megabytes of text to encode (default 8)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; the best is reported (default 5)")
    parser.add_argument("--out", type=Path, help="append the results to this file as JSON lines")
    args = parser.parse_args(argv)
    if args.mb <= 0 or args.repeats < 1:
        parser.error("--mb must be > 0 and --repeats >= 1")

    text, source = load_text(int(args.mb * 1e6))
    n_bytes = len(text.encode("utf-8"))
    common = {
        "bench": "codec",
        "source": source,
        "n_bytes": n_bytes,
        "repeats": args.repeats,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    results = []
    for parity in (True, False):
        bits = text_to_bits(text, parity=parity)
        if bits_to_text(bits, parity=parity) != text:
            raise RuntimeError(f"codec round trip failed (parity={parity})")
        timings = {
            "text_to_bits": best_seconds(lambda: text_to_bits(text, parity=parity), args.repeats),
            "bits_to_text": best_seconds(lambda: bits_to_text(bits, parity=parity), args.repeats),
        }
        for op, seconds in timings.items():
            record = {**common, "op": op, "parity": parity, "mb_per_s": round(n_bytes / seconds / 1e6, 1)}
            results.append(record)
            print(json.dumps(record), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a", encoding="utf-8") as fh:
            for record in results:
                fh.write(json.dumps(record) + "\n")
    return results


if __name__ == "__main__":
    main()
