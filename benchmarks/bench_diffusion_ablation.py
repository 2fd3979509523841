"""Short ablations of the patched diffusion model: the neighbour convolution and the training schedule.

Each variant trains the tiny patched preset, non-causal, for --steps AdamW steps (batch 16 x 64
bytes of tinyshakespeare, the same seed and batches), then reports its ELBO bpb on the first 20
validation batches and its bits per masked byte at 5% and 95% masking. A model that has learned
nothing beyond byte frequencies scores the same at both rates (the unigram entropy, about 4.8).
Variants: the input convolution removed (`none`), a full convolution of kernel 3, 5 or 9, the
default depthwise kernel 9; then the default under each training schedule.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bitlm.codec import bytes_to_bit_tensor
from bitlm.data import Corpus
from bitlm.diffusion import NOISE_SCHEDULES, diffusion_batch_loss, evaluate_elbo
from bitlm.model import MASK, BitTransformerLM

from common import contender_config, emit, load_shakespeare


class _NoMixing(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def build(conv: str) -> BitTransformerLM:
    torch.manual_seed(0)
    model = BitTransformerLM(contender_config("patched", "tiny", 64, causal=False))
    d = model.config.d_model
    if conv == "none":
        model.body.neighbour_mix = _NoMixing()
    elif conv.startswith("full"):
        kernel = int(conv[4:])
        model.body.neighbour_mix = nn.Conv1d(d, d, kernel, padding=kernel // 2)
    elif conv != "depthwise9":
        raise SystemExit(f"unknown convolution variant {conv!r}")
    return model


@torch.no_grad()
def bits_per_masked_byte(model, batches, rate: float) -> float:
    gen = torch.Generator().manual_seed(0)
    bpb = model.config.bits_per_byte
    total, n_bytes = 0.0, 0
    for batch in batches:
        bits = bytes_to_bit_tensor(batch, parity=model.config.parity)
        masked = (torch.rand(batch.shape, generator=gen) < rate).repeat_interleave(bpb, dim=1)
        logits, _ = model(torch.where(masked, torch.full_like(bits, MASK), bits), causal=False, local_prefix=bits)
        nll = F.cross_entropy(logits.float().reshape(-1, 2), bits.reshape(-1), reduction="none").view_as(bits)
        total += float((nll * masked).sum()) / math.log(2)
        n_bytes += int(masked.sum()) // bpb
    return total / n_bytes


def run(conv: str, schedule: str, corpus: Corpus, args) -> dict:
    model = build(conv)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    noise = torch.Generator().manual_seed(0)
    batches = corpus.train.random_batches(16, 64, seed=0)
    for _ in range(args.steps):
        out = diffusion_batch_loss(model, next(batches), schedule=schedule, generator=noise)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    val = list(corpus.val.sequential_batches(64, 64))[:20]
    return {"bench": "diffusion_ablation", "conv": conv, "schedule": schedule, "steps": args.steps,
            "params": model.num_parameters(), "val_elbo_bpb": evaluate_elbo(model, val, schedule="linear")["elbo_bpb"],
            "bits_per_masked_byte_at_5pct": bits_per_masked_byte(model, val, 0.05),
            "bits_per_masked_byte_at_95pct": bits_per_masked_byte(model, val, 0.95)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--convs", default="none,full3,full5,full9,depthwise9")
    parser.add_argument("--schedules", default=",".join(NOISE_SCHEDULES))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    corpus = Corpus.from_bytes(load_shakespeare(), window_bytes=1024, val_fraction=0.1)
    for conv in args.convs.split(","):
        emit(run(conv, "cosine", corpus, args), args.out)
    for schedule in args.schedules.split(","):
        if schedule != "cosine" or "depthwise9" not in args.convs.split(","):
            emit(run("depthwise9", schedule, corpus, args), args.out)


if __name__ == "__main__":
    main()
