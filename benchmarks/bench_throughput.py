"""Training throughput (bytes/s and bits/s) of the flat and patched bit models and the byte baseline.

--recipe applies a named recipe (bitlm/recipes.py): its model options and its optimizer (Muon's
orthogonalisation is part of the step's cost).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bitlm.config import ExperimentConfig, TrainConfig
from bitlm.data import Corpus
from bitlm.engine import build_optimizer
from bitlm.model import BitTransformerLM
from bitlm.objective import batch_loss
from bitlm.recipes import RECIPES

from common import CONTENDERS, contender_config, emit, load_shakespeare, with_recipe


def steady_state_rate(model, corpus, cfg: TrainConfig, steps: int, warmup: int) -> float:
    """Seconds per optimizer step after `warmup` untimed steps."""
    opt = build_optimizer(model, cfg)
    batches = corpus.train.random_batches(cfg.batch_size, cfg.context_bytes, seed=0)
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        out = batch_loss(model, next(batches))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context-bytes", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--models", default=",".join(CONTENDERS))
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="original")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    corpus = Corpus.from_bytes(load_shakespeare(), window_bytes=1024)
    rates = {}
    for name in args.models.split(","):
        exp = with_recipe(ExperimentConfig(model=contender_config(name, args.preset, args.context_bytes),
                                           train=TrainConfig(batch_size=args.batch_size, context_bytes=args.context_bytes)),
                          args.recipe)
        model_cfg, cfg = exp.model, exp.train
        torch.manual_seed(0)
        model = BitTransformerLM(model_cfg).train()
        seconds = steady_state_rate(model, corpus, cfg, args.steps, args.warmup)
        bytes_per_s = args.batch_size * args.context_bytes / seconds
        rates[name] = bytes_per_s
        emit({"bench": "train_throughput", "model": name, "preset": args.preset, "recipe": args.recipe,
              "params": model.num_parameters(), "batch_size": args.batch_size, "context_bytes": args.context_bytes,
              "positions_per_step": args.batch_size * args.context_bytes * model_cfg.positions_per_byte,
              "bytes_per_s": bytes_per_s, "bits_per_s": bytes_per_s * model_cfg.bits_per_byte,
              "positions_per_s": bytes_per_s * model_cfg.positions_per_byte, "s_per_step": seconds}, args.out)
    if "byte" in rates:
        emit({"bench": "train_throughput_vs_byte"} | {f"{k}_over_byte": v / rates["byte"] for k, v in rates.items()},
             args.out)


if __name__ == "__main__":
    main()
