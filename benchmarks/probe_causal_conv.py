"""Probe: does the causal input convolution (model.input_conv) help the causal models?

The diffusion ablation (bench_diffusion_ablation.py) showed a depthwise convolution over byte
vectors lifting the non-causal patched model off its unigram plateau. This probe asks the same of
the causal models: each trains the tiny preset for --steps AdamW steps (batch 16 x 64 bytes, the
same seed and batches) with model.input_conv=0 and =--kernel (position t mixes the input vectors
of positions t-kernel+1..t: id embeddings for the byte model, byte vectors after the BOS shift for
the patched one), then reports val bpb on 20 validation batches. The first version of this probe
(BENCHMARKS.md, 2026-11-22) wrapped the encoders from outside, before the BOS shift; the
library's option is what runs now.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from bitlm.data import Corpus
from bitlm.model import BitTransformerLM
from bitlm.objective import batch_loss, evaluate_bpb

from common import contender_config, emit, load_shakespeare


def build(kind: str, kernel: int) -> BitTransformerLM:
    torch.manual_seed(0)
    return BitTransformerLM(contender_config(kind, "tiny", 64, input_conv=kernel))


def run(kind: str, kernel: int, corpus: Corpus, args) -> dict:
    model = build(kind, kernel)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    batches = corpus.train.random_batches(16, 64, seed=0)
    start = time.perf_counter()
    for _ in range(args.steps):
        out = batch_loss(model, next(batches))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    seconds = time.perf_counter() - start
    val = list(corpus.val.sequential_batches(64, 64))[:20]
    return {"bench": "probe_causal_conv", "model": kind, "kernel": kernel, "steps": args.steps,
            "train_seconds": seconds, "params": model.num_parameters(), "val_bpb": evaluate_bpb(model, val)["bpb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--kernel", type=int, default=8)
    parser.add_argument("--models", default="patched,byte")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    corpus = Corpus.from_bytes(load_shakespeare(), window_bytes=1024, val_fraction=0.1)
    for kind in args.models.split(","):
        for kernel in (0, args.kernel):
            emit(run(kind, kernel, corpus, args), args.out)


if __name__ == "__main__":
    main()
