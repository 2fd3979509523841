"""What each bit of a byte costs a trained bit model: bits per byte split by bit phase.

The parity bit (phase 8) is a known function of the eight data bits before it, so a model that has
learnt it spends almost nothing there; what it does spend is the most the bit structure could give
back by computing parity instead of predicting it. The same split shows where in a byte the
uncertainty sits (the high bits of ASCII text are nearly free, the low ones carry the letter).

    cd benchmarks && python probe_bit_phases.py results/models/patched --out results/bit_phases.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bitlm.checkpoint import from_pretrained
from bitlm.data import Corpus
from bitlm.objective import LN2, model_inputs

from common import emit, load_shakespeare


@torch.no_grad()
def phase_costs(model, batches) -> tuple[list[float], int]:
    """Summed -log2 p of each bit phase over the scored bytes (every byte of a window but its first)."""
    cfg = model.config
    per_phase = torch.zeros(cfg.ids_per_byte, dtype=torch.float64)
    n_bytes = 0
    for batch in batches:
        ids = model_inputs(model, batch)
        logits = model(ids, causal=True)[0]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
        scored = nll[:, cfg.ids_per_byte - 1:]  # entry t predicts id t + 1: from byte 1's first bit on
        per_phase += scored.reshape(ids.shape[0], -1, cfg.ids_per_byte).sum((0, 1)).double() / LN2
        n_bytes += scored.shape[0] * scored.shape[1] // cfg.ids_per_byte
    return per_phase.tolist(), n_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a model directory (save_pretrained) of a bit model")
    parser.add_argument("--context-bytes", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model = from_pretrained(args.model).eval()
    if model.config.representation != "bit":
        raise SystemExit(f"{args.model}: a {model.config.representation} model has no bit phases")
    corpus = Corpus.from_bytes(load_shakespeare(), window_bytes=1024, val_fraction=0.1)
    costs, n_bytes = phase_costs(model, corpus.val.sequential_batches(64, args.context_bytes))
    per_byte = [c / n_bytes for c in costs]
    for phase, value in enumerate(per_byte):
        print(f"bit {phase}{' (parity)' if model.config.parity and phase == 8 else ''}: {value:.4f} bits/byte")
    print(f"total: {sum(per_byte):.4f} bits/byte on {n_bytes:,} bytes")
    emit({"bench": "bit_phases", "model": str(args.model), "arch": model.config.arch, "parity": model.config.parity,
          "n_bytes": n_bytes, "bits_per_byte_by_phase": per_byte, "bpb": sum(per_byte)}, args.out)


if __name__ == "__main__":
    main()
