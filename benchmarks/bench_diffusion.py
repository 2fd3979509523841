"""Diffusion mode on tinyshakespeare: ELBO bpb after a time budget, and sample quality by steps and schedule.

The model is trained with the quality race's recipe (bench_quality.py) so its ELBO bpb (an upper
bound) stands beside the same architecture's causal bpb from that race. Samples: 128 bytes after
a 32-byte prompt from the validation text; reported are the fraction of sampled bytes that are
printable ASCII (32-126 plus newline) after parity enforcement, and parity corrections per 100 bytes.
--recipe applies a named recipe (bitlm/recipes.py) on top, as the race does with --set (the tuned
recipe's input convolution is centred, not causal, in a non-causal model).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

from bitlm.checkpoint import save_pretrained
from bitlm.config import DiffusionConfig, ExperimentConfig, TrainConfig
from bitlm.data import Corpus
from bitlm.diffusion import NOISE_SCHEDULES, diffusion_sample, evaluate_elbo
from bitlm.engine import fit
from bitlm.model import BitTransformerLM
from bitlm.recipes import RECIPES

from common import contender_config, emit, load_shakespeare, with_recipe

PRINTABLE = set(range(32, 127)) | {10}


def sample_quality(model, val_text: bytes, *, steps: int, schedule: str, n_samples: int, new_bytes: int) -> dict:
    rng = random.Random(0)
    printable = total = corrections = 0
    for i in range(n_samples):
        start = rng.randrange(0, len(val_text) - 32)
        out = diffusion_sample(model, val_text[start:start + 32], new_bytes, steps=steps, schedule=schedule, seed=i)
        printable += sum(b in PRINTABLE for b in out.new_bytes)
        total += len(out.new_bytes)
        corrections += out.n_parity_corrections
    return {"printable_fraction": printable / total, "parity_corrections_per_100_bytes": 100 * corrections / total,
            "n_bytes": total, "example": out.text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--model", default="patched", choices=["patched", "flat"])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--context-bytes", type=int, default=64)
    parser.add_argument("--noise-schedule", default="cosine", choices=NOISE_SCHEDULES)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--save", type=Path, default=Path("results/diffusion-model"))
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="original")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = Corpus.from_bytes(load_shakespeare(), window_bytes=1024, val_fraction=0.1)
    # room for the 32-byte prompt + 128 sampled bytes at sampling time; training uses 64-byte contexts
    cfg = contender_config(args.model, args.preset, 160, causal=False)
    train = TrainConfig(batch_size=16, context_bytes=args.context_bytes, lr=3e-3, max_steps=10_000_000,
                        max_seconds=args.minutes * 60, warmup_steps=100, eval_every=500, eval_batches=10,
                        log_every=100, seed=0)
    exp = with_recipe(ExperimentConfig(model=cfg, train=train, diffusion=DiffusionConfig(noise_schedule=args.noise_schedule)),
                      args.recipe)
    cfg = exp.model
    torch.manual_seed(0)
    model = BitTransformerLM(cfg)
    result = fit(model, corpus, exp)
    final = evaluate_elbo(model, corpus.val.sequential_batches(64, args.context_bytes), schedule=args.noise_schedule)
    save_pretrained(model, args.save)
    emit({"bench": "diffusion_elbo", "model": args.model, "minutes": args.minutes, "noise_schedule": args.noise_schedule,
          "recipe": args.recipe,
          "params": model.num_parameters(), "steps": result.step, "train_seconds": result.train_seconds,
          "val_elbo_bpb": final["elbo_bpb"], "val_bytes_scored": final["n_bytes"]}, args.out)
    val_text = corpus.val.to_numpy().tobytes()
    for schedule in NOISE_SCHEDULES:
        for steps in (8, 16):
            quality = sample_quality(model, val_text, steps=steps, schedule=schedule, n_samples=args.samples,
                                     new_bytes=128)
            emit({"bench": "diffusion_samples", "model": args.model, "sampling_steps": steps,
                  "sampling_schedule": schedule, "trained_schedule": args.noise_schedule} | quality, args.out)


if __name__ == "__main__":
    main()
