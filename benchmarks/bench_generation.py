"""Generation speed (bytes/s, KV cache, batch 1) of the byte baseline and the flat and patched bit models.

A contender is a model name, or model:unit with unit "bit" or "byte" (bitlm.sampling's sampling_unit):
patched:bit samples bit by bit, patched:byte (patched's default) one whole byte per global step.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bitlm.model import BitTransformerLM
from bitlm.sampling import generate, resolve_sampling_unit

from common import CONTENDERS, contender_config, emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--models", default="byte,flat,patched:bit,patched:byte")
    parser.add_argument("--prompt-bytes", type=int, default=64)
    parser.add_argument("--new-bytes", type=int, default=192)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    prompt = ("To be, or not to be, that is the question: " * 8)[: args.prompt_bytes]
    for contender in args.models.split(","):
        name, _, unit = contender.partition(":")
        if name not in CONTENDERS:
            parser.error(f"--models: unknown model {name!r} (one of {', '.join(CONTENDERS)})")
        unit = unit or None
        cfg = contender_config(name, args.preset, args.prompt_bytes + args.new_bytes)
        torch.manual_seed(0)
        model = BitTransformerLM(cfg).eval()
        generate(model, prompt, 4, seed=0, sampling_unit=unit)  # warm-up
        start = time.perf_counter()
        generate(model, prompt, args.new_bytes, seed=0, sampling_unit=unit)
        seconds = time.perf_counter() - start
        emit({"bench": "generation", "model": name, "sampling_unit": resolve_sampling_unit(cfg, unit), "preset": args.preset, "params": model.num_parameters(),
              "prompt_bytes": args.prompt_bytes, "new_bytes": args.new_bytes,
              "bytes_per_s": args.new_bytes / seconds}, args.out)


if __name__ == "__main__":
    main()
