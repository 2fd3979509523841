"""Forward + backward of the causal loss with the whole window as input or without its last id
(bitlm.objective.scored_inputs), for the byte and patched models on the tuned recipe.

The loss reads no logit of the last position, so the window minus its last id gives the same loss
and gradients (tests/bitlm/test_local_decoder_options.py). For the patched model that drops the
last byte from its stack (BOS + L - 1 bytes: L positions instead of L + 1); for the byte model one
of its L positions. The two inputs alternate step by step on the same batches, in one process, and
the medians are compared: the ratio is what scored_inputs' choice per model rests on.

    python benchmarks/bench_scored_inputs.py --threads 1 --out benchmarks/results/scored_inputs.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bitlm.config import ExperimentConfig, TrainConfig
from bitlm.data import Corpus
from bitlm.model import BitTransformerLM
from bitlm.objective import causal_loss, model_inputs

from common import contender_config, emit, load_shakespeare, race_shape_arguments, with_recipe


def timed_step(model, x: torch.Tensor, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    causal_loss(model(x, causal=True)[0], ids, model.config).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    race_shape_arguments(parser, extra=(
        ("--steps", {"type": int, "default": 120, "help": "steps of each input (the first 10 untimed)"}),
        ("--models", {"default": "byte,patched"})))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = Corpus.from_bytes(load_shakespeare(), window_bytes=1024)
    for name in args.models.split(","):
        exp = with_recipe(ExperimentConfig(model=contender_config(name, args.preset, args.context_bytes),
                                           train=TrainConfig(batch_size=args.batch_size,
                                                             context_bytes=args.context_bytes)), "tuned")
        torch.manual_seed(0)
        model = BitTransformerLM(exp.model).train()
        batches = corpus.train.random_batches(args.batch_size, args.context_bytes, seed=0)
        seconds: dict[str, list[float]] = {"whole": [], "trimmed": []}
        for i in range(args.steps):
            ids = model_inputs(model, next(batches))
            for mode in ("whole", "trimmed") if i % 2 else ("trimmed", "whole"):  # neither always goes first
                seconds[mode].append(timed_step(model, ids if mode == "whole" else ids[:, :-1], ids))
        ms = {mode: statistics.median(values[10:]) * 1000 for mode, values in seconds.items()}
        emit({"bench": "scored_inputs", "model": name, "preset": args.preset, "batch_size": args.batch_size,
              "context_bytes": args.context_bytes, "ms_whole": ms["whole"], "ms_trimmed": ms["trimmed"],
              "trimmed_over_whole": ms["trimmed"] / ms["whole"]}, args.out)


if __name__ == "__main__":
    main()
