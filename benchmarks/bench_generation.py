"""Generation speed (bytes/s, KV cache, batch 1) of the byte baseline and the flat and patched bit models.

A contender is a model name, or model:unit with unit "bit" or "byte" (bitlm.sampling's sampling_unit):
patched:bit samples bit by bit, patched:byte (patched's default) one whole byte per global step.
--recipe applies a named recipe's model options (bitlm/recipes.py), e.g. the tuned one's rotary
positions and input convolution; fresh weights, so the figures are speed only.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bitlm.model import BitTransformerLM
from bitlm.recipes import RECIPES
from bitlm.sampling import generate, resolve_sampling_unit

from common import CONTENDERS, contender_config, emit, recipe_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--models", default="byte,flat,patched:bit,patched:byte")
    parser.add_argument("--prompt-bytes", type=int, default=64)
    parser.add_argument("--new-bytes", type=int, default=192)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="original")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    prompt = ("To be, or not to be, that is the question: " * 8)[: args.prompt_bytes]
    for contender in args.models.split(","):
        name, _, unit = contender.partition(":")
        if name not in CONTENDERS:
            parser.error(f"--models: unknown model {name!r} (one of {', '.join(CONTENDERS)})")
        unit = unit or None
        cfg = recipe_model(contender_config(name, args.preset, args.prompt_bytes + args.new_bytes), args.recipe)
        torch.manual_seed(0)
        model = BitTransformerLM(cfg).eval()
        generate(model, prompt, 4, seed=0, sampling_unit=unit)  # warm-up
        start = time.perf_counter()
        generate(model, prompt, args.new_bytes, seed=0, sampling_unit=unit)
        seconds = time.perf_counter() - start
        emit({"bench": "generation", "model": name, "sampling_unit": resolve_sampling_unit(cfg, unit),
              "preset": args.preset, "recipe": args.recipe, "params": model.num_parameters(),
              "prompt_bytes": args.prompt_bytes, "new_bytes": args.new_bytes,
              "bytes_per_s": args.new_bytes / seconds}, args.out)


if __name__ == "__main__":
    main()
