"""Training cost of the output readout alone: per-byte features -> logits -> the causal loss, forward
and backward, for the byte model's head and the patched model's readouts (fixed random features,
so only the readout runs; the rest of a step is the same transformer for every contender).

Contenders: byte (the 256-way head), tree (the patched model's per-node vectors), softmax_autograd
(model.byte_softmax, scores through autograd over the whole tree: the path before
bitlm.pattern_joint's backward), softmax (the same scores with that backward) and known_parity
(model.known_parity: the 256 data patterns, the parity bit fixed). The patched ones carry the
tuned recipe's other options (shared bits, no projection, byte table).

    python benchmarks/bench_readout.py --threads 1 --out benchmarks/results/readout.jsonl
"""

from __future__ import annotations

import argparse

import torch

from bitlm.config import ModelConfig, apply_overrides, ExperimentConfig
from bitlm.data import Corpus
from bitlm.model import BitTransformerLM
from bitlm.objective import causal_loss, model_inputs
from bitlm.pattern_joint import path_scores, tree_masses

from common import best_seconds, contender_config, emit, load_shakespeare, race_shape_arguments

_PATCHED = ["model.tree_shared_bits=true", "model.local_d_ff=0", "model.byte_table=true"]
CONTENDERS = {
    "byte": ("byte", []),
    "tree": ("patched", _PATCHED),
    "softmax_autograd": ("patched", _PATCHED + ["model.byte_softmax=true"]),
    "softmax": ("patched", _PATCHED + ["model.byte_softmax=true"]),
    "known_parity": ("patched", _PATCHED + ["model.byte_softmax=true", "model.known_parity=true"]),
}


def _autograd_readout(body, ctx: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """PatchedBody.readout with the byte softmax's scores through autograd over every tree level."""
    B, T = ids.shape
    bpb = body.bits_per_byte
    bits = ids.view(B, T // bpb, bpb)
    padded = torch.cat([bits, torch.zeros_like(bits[:, :1])], dim=1)
    phases = torch.arange(bpb)
    nodes = body._path_nodes(padded[..., :-1], phases)
    vectors, bias = body.node_table()
    score = path_scores(tree_masses(torch.nn.functional.linear(ctx, vectors, bias)), nodes)
    return torch.stack([torch.zeros_like(score), score], dim=-1).reshape(B, -1, 2)[:, 1:T + 1]


def readout_step(name: str, model: BitTransformerLM, ids: torch.Tensor, features: torch.Tensor):
    """One forward and backward of the readout and the loss from `features` (a fresh leaf each call)."""
    body = model.body

    def step() -> None:
        ctx = features.clone().requires_grad_()
        if name == "byte":
            logits = body.head(body.norm(ctx))
        elif name == "softmax_autograd":
            logits = _autograd_readout(body, ctx, ids)
        else:
            logits = body.readout(ctx, ids)
        causal_loss(logits, ids, model.config).loss.backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    race_shape_arguments(parser, extra=(("--repeats", {"type": int, "default": 30}),))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = Corpus.from_bytes(load_shakespeare(), window_bytes=1024)
    batch = next(corpus.train.random_batches(args.batch_size, args.context_bytes, seed=0))
    ms = {}
    for name, (kind, sets) in CONTENDERS.items():
        plain = ExperimentConfig(model=contender_config(kind, args.preset, args.context_bytes))
        cfg: ModelConfig = apply_overrides(plain, sets).model
        torch.manual_seed(0)
        model = BitTransformerLM(cfg).train()
        ids = model_inputs(model, batch)
        n_states = ids.shape[1] // cfg.ids_per_byte + (kind == "patched")  # + the patched model's BOS state
        features = torch.randn(args.batch_size, n_states, cfg.d_model)
        step = readout_step(name, model, ids, features)
        for _ in range(3):
            step()
        ms[name] = best_seconds(step, args.repeats) * 1000
        emit({"bench": "readout", "contender": name, "preset": args.preset, "batch_size": args.batch_size,
              "context_bytes": args.context_bytes, "ms_forward_backward": ms[name]}, args.out)
    emit({"bench": "readout_vs_byte"} | {f"{k}_over_byte": v / ms["byte"] for k, v in ms.items()}, args.out)


if __name__ == "__main__":
    main()
