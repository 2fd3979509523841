"""Decoding speed with the KV cache vs recomputing the whole prefix, at 1k and 4k bits of context."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bitlm.config import ModelConfig
from bitlm.model import BitTransformerLM
from bitlm.sampling import generate_ids

from common import emit


def seconds_per_bit(model, prompt: torch.Tensor, n_new: int, use_cache: bool) -> float:
    start = time.perf_counter()
    generate_ids(model, prompt, n_new, temperature=1.0, seed=0, use_cache=use_cache)
    return (time.perf_counter() - start) / n_new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--contexts", default="1024,4096", help="prompt lengths in bits")
    parser.add_argument("--new-bits", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    cfg = ModelConfig.from_name(args.preset, max_positions=max(contexts) + args.new_bits)
    torch.manual_seed(0)
    model = BitTransformerLM(cfg).eval()
    for n_bits in contexts:
        prompt = torch.randint(0, 2, (1, n_bits))
        seconds_per_bit(model, prompt, 4, use_cache=True)  # warm-up
        cached = seconds_per_bit(model, prompt, args.new_bits, use_cache=True)
        full = seconds_per_bit(model, prompt, args.new_bits, use_cache=False)
        emit({"bench": "kv_cache_decoding", "preset": args.preset, "context_bits": n_bits, "new_bits": args.new_bits,
              "cached_ms_per_bit": cached * 1e3, "recompute_ms_per_bit": full * 1e3, "speedup": full / cached}, args.out)


if __name__ == "__main__":
    main()
