"""Masked (absorbing-state) diffusion over bits: noise schedules, the ELBO objective and the sampler.

Forward process: at time t in [0, 1] every bit (flat model) or every byte, all its bits at once
(patched model), is independently replaced by MASK with probability m(t), a schedule rising from
m(0) = 0 to m(1) = 1. The patched model scores a masked byte's bits down its causal tree given
the byte's earlier clean bits, so its per-byte term is -log p(byte) exactly; a flat model
predicts masked bits independently, and its bound pays for the dependence between them. The
model, run non-causally, predicts each masked unit from the partly masked sequence z. With
w(t) = m'(t) / m(t), the continuous-time bound is

    -log p(x) <= E_{t ~ U(0,1)} [ w(t) * sum_{i masked at t} -log p(x_i | z_t) ].

We estimate it in its Rao-Blackwellised form. Given the number k of masked units out of n, the
masked set is a uniform k-subset, and integrating w(t) Binomial(k; n, m(t)) over t gives exactly
1/k for every schedule, so the same bound reads

    -log p(x) <= sum_{k=1..n} (1/k) E_{|M| = k} [ sum_{i in M} -log p(x_i | z_M) ].

Training draws k from P(k), the distribution a uniform t induces through m(t) (so the schedule
decides which noise levels the model sees most), and weights the row by 1 / (k P(k)). The
expectation is the bound above; the weights stay bounded, whereas w(t) ~ 1/t in the time form
gives rows with a tiny t and one masked unit weights in the thousands. In bits and divided by
the number of bytes it is the ELBO bpb reported beside causal bpb: an upper bound on the model's
true bits per byte, so the comparison is conservative for diffusion.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, get_args

import numpy as np
import torch
import torch.nn.functional as F

from .codec import bits_to_bytes, bytes_to_bit_tensor, bytes_to_bits, enforce_parity
from .config import NoiseSchedule
from .model import MASK
from .modes import eval_mode
from .objective import LN2, LossOutput, bits_per_byte_over
from .sampling import Generation

NOISE_SCHEDULES: tuple[str, ...] = get_args(NoiseSchedule)
_EXP_RATE = 5.0  # "exp": masks quickly early, m(t) = (1 - e^{-5t}) / (1 - e^{-5})
_LOGIT_SPAN = 6.0  # "loglinear": log-odds of the mask rate linear in t, from -6 to +6, rescaled to [0, 1]


def _check_schedule(schedule: str) -> None:
    if schedule not in NOISE_SCHEDULES:
        raise ValueError(f"noise schedule: unknown {schedule!r}; choose from {list(NOISE_SCHEDULES)}")


def mask_rate(t: torch.Tensor, schedule: str) -> torch.Tensor:
    """m(t): the probability that a bit is masked at time t; increasing, m(0) = 0, m(1) = 1."""
    _check_schedule(schedule)
    t = t.clamp(0.0, 1.0)
    if schedule == "linear":
        return t
    if schedule == "cosine":
        return 1.0 - torch.cos(0.5 * math.pi * t)
    if schedule == "exp":
        return -torch.expm1(-_EXP_RATE * t) / -math.expm1(-_EXP_RATE)
    lo, hi = torch.sigmoid(torch.tensor(-_LOGIT_SPAN)), torch.sigmoid(torch.tensor(_LOGIT_SPAN))
    return (torch.sigmoid(_LOGIT_SPAN * (2.0 * t - 1.0)) - lo) / (hi - lo)


def mask_rate_derivative(t: torch.Tensor, schedule: str) -> torch.Tensor:
    """dm/dt, the rate at which bits become masked."""
    _check_schedule(schedule)
    t = t.clamp(0.0, 1.0)
    if schedule == "linear":
        return torch.ones_like(t)
    if schedule == "cosine":
        return 0.5 * math.pi * torch.sin(0.5 * math.pi * t)
    if schedule == "exp":
        return _EXP_RATE * torch.exp(-_EXP_RATE * t) / -math.expm1(-_EXP_RATE)
    lo, hi = torch.sigmoid(torch.tensor(-_LOGIT_SPAN)), torch.sigmoid(torch.tensor(_LOGIT_SPAN))
    s = torch.sigmoid(_LOGIT_SPAN * (2.0 * t - 1.0))
    return 2.0 * _LOGIT_SPAN * s * (1.0 - s) / (hi - lo)


_QUADRATURE_POINTS = 16_384  # midpoint rule over t for the masked-count distribution


@functools.lru_cache(maxsize=64)
def _masked_count_table(n: int, schedule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(P(k | k >= 1), its CDF) for k = 1..n: how many of n units a uniform t masks under m(t)."""
    t = (torch.arange(_QUADRATURE_POINTS, dtype=torch.float64) + 0.5) / _QUADRATURE_POINTS
    m = mask_rate(t, schedule).to(torch.float64).clamp(1e-300, 1.0 - 1e-16)[:, None]
    k = torch.arange(n + 1, dtype=torch.float64)[None, :]
    log_choose = torch.lgamma(torch.tensor(n + 1.0, dtype=torch.float64)) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
    pmf = torch.exp(log_choose + k * m.log() + (n - k) * torch.log1p(-m)).mean(dim=0)[1:]
    pmf = pmf / pmf.sum()
    return pmf, pmf.cumsum(0)


def masked_count_distribution(n: int, schedule: str) -> torch.Tensor:
    """P(k) for k = 1..n: the number of masked units (bytes or bits) when t ~ U(0, 1) masks each of n
    units independently with probability m(t), conditioned on k >= 1 (k = 0 adds nothing to the bound)."""
    _check_schedule(schedule)
    if n < 1:
        raise ValueError(f"need at least one unit to mask, got n={n}")
    return _masked_count_table(n, schedule)[0].clone()


def sample_masked_counts(batch_size: int, n: int, *, schedule: str, generator: torch.Generator,
                         progress: float = 1.0, curriculum: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked counts k (batch_size,) in 1..n and their bound weights 1 / (k P(k)).

    Counts are low-discrepancy across the batch (one uniform per 1/B stratum, mapped through the
    CDF of P(k)), which keeps the estimate unbiased and lowers its variance.
    curriculum: u -> u^gamma with gamma rising from 0.25 to 1 over training, so early steps see
    mostly heavy noise; the training loss is then a reweighted objective, not the ELBO itself.
    """
    pmf, cdf = _masked_count_table(n, schedule)
    u = (torch.arange(batch_size, dtype=torch.float64)
         + torch.rand(batch_size, generator=generator, dtype=torch.float64)) / batch_size
    u = u[torch.randperm(batch_size, generator=generator)]  # strata land on random rows
    if curriculum:
        u = u ** (0.25 + 0.75 * min(max(progress, 0.0), 1.0))
    index = torch.searchsorted(cdf, u * cdf[-1]).clamp(max=n - 1)
    k = index + 1
    return k, (1.0 / (k.to(torch.float64) * pmf[index])).to(torch.float32)


def mask_exactly(counts: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """(B, n) bool masks with counts[b] units masked in row b, the units a uniformly random subset."""
    ranks = torch.rand(counts.shape[0], n, generator=generator).argsort(dim=1).argsort(dim=1)
    return ranks < counts[:, None]


@dataclass
class Corruption:
    """One masked set per row of a batch: what the model reads, and what the bound is computed from."""

    inputs: torch.Tensor  # (B, T) bits with the masked ones replaced by MASK
    bits: torch.Tensor  # (B, T) clean bits
    masked: torch.Tensor  # (B, T) bool
    weight: torch.Tensor  # (B,) bound weights 1 / (k P(k))
    byte_level: bool  # patched: whole bytes masked, their bits read down the tree given the clean prefix

    def forward_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of the model's forward beside the inputs (causal=False)."""
        return {"local_prefix": self.bits} if self.byte_level else {}


def corrupt(cfg, byte_windows: torch.Tensor, *, schedule: str, generator: torch.Generator,
            progress: float = 1.0, curriculum: bool = False) -> Corruption:
    """Mask a (B, L) byte batch (already on the model's device) for a non-causal model with ModelConfig `cfg`."""
    bits = bytes_to_bit_tensor(byte_windows, parity=cfg.parity)  # (B, T)
    B, T = bits.shape
    byte_level = cfg.arch == "patched"
    bpb = cfg.bits_per_byte
    # the units masked together: whole bytes (patched: their bits scored exactly down the tree) or bits
    n_units = T // bpb if byte_level else T
    counts, weight = sample_masked_counts(B, n_units, schedule=schedule, generator=generator,
                                          progress=progress, curriculum=curriculum)
    masked = mask_exactly(counts, n_units, generator).to(bits.device)
    if byte_level:
        masked = masked.repeat_interleave(bpb, dim=1)
    return Corruption(inputs=torch.where(masked, torch.full_like(bits, MASK), bits), bits=bits, masked=masked,
                      weight=weight.to(bits.device), byte_level=byte_level)


def diffusion_loss(logits: torch.Tensor, noised: Corruption, bits_per_byte: int) -> LossOutput:
    """The ELBO of a batch from the (B, T, 2) logits a non-causal model gave for `noised.inputs`.

    loss: the ELBO in nats per bit (what training minimises); nll_bits: the summed ELBO in bits,
    an upper bound on the batch's negative log2-likelihood; n_bytes: every byte of the batch.
    """
    B, T = noised.bits.shape
    nll = F.cross_entropy(logits.float().reshape(-1, 2), noised.bits.reshape(-1), reduction="none").view(B, T)
    per_row = (nll * noised.masked).sum(dim=1) * noised.weight  # nats, an unbiased estimate of each row's bound
    return LossOutput(loss=per_row.sum() / (B * T), nll_bits=per_row.detach().sum() / LN2,
                      n_bytes=B * (T // bits_per_byte), p_one=logits.float().softmax(-1)[..., 1])


def diffusion_batch_loss(model, byte_windows: torch.Tensor, *, schedule: str, generator: torch.Generator,
                         progress: float = 1.0, curriculum: bool = False) -> LossOutput:
    """diffusion_loss of a plain non-causal model on a (B, L) byte batch: corrupt, forward, loss."""
    check_diffusion_model(model.config)
    device = next(model.parameters()).device
    noised = corrupt(model.config, byte_windows.to(device), schedule=schedule, generator=generator,
                     progress=progress, curriculum=curriculum)
    logits, _ = model(noised.inputs, causal=False, **noised.forward_kwargs())
    return diffusion_loss(logits, noised, model.config.bits_per_byte)


def check_diffusion_model(cfg) -> None:
    """ValueError naming the field unless ModelConfig `cfg` describes a model diffusion can train."""
    if cfg.causal:
        raise ValueError("diffusion needs a non-causal model (model.causal=False)")
    if cfg.chunk_size is not None:
        raise ValueError("model.chunk_size: chunked attention is off in diffusion mode; set it to None")
    if cfg.representation != "bit":
        raise ValueError("diffusion over bits needs representation='bit'")


@torch.no_grad()
def diffusion_sample(model, prompt: str | bytes, max_new_bytes: int, *, steps: int = 16,
                     schedule: str = "cosine", temperature: float = 1.0, seed: Optional[int] = None) -> Generation:
    """Fill max_new_bytes after a prompt by reverse diffusion in `steps` steps.

    Prompt bits are never masked or changed. At step s (t = s/S down to (s-1)/S) each still-masked
    bit is revealed with probability (m(t) - m(t')) / m(t), its value drawn from the model's
    prediction; the last step reveals the rest. Parity is enforced afterwards and the number of
    corrected bytes reported.
    """
    check_diffusion_model(model.config)
    _check_schedule(schedule)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if max_new_bytes < 1:
        raise ValueError(f"max_new_bytes must be >= 1, got {max_new_bytes}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for diffusion sampling, got {temperature}")
    cfg = model.config
    data = prompt.encode("utf-8") if isinstance(prompt, str) else bytes(prompt)
    device = next(model.parameters()).device
    prompt_bits = torch.as_tensor(bytes_to_bits(data, parity=cfg.parity), dtype=torch.long, device=device)
    n_new = max_new_bytes * cfg.bits_per_byte
    if prompt_bits.numel() + n_new > cfg.max_input_ids:
        raise ValueError(f"prompt ({len(data)} bytes) + max_new_bytes ({max_new_bytes}) needs "
                         f"{prompt_bits.numel() + n_new} bits; the model takes {cfg.max_input_ids}")
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    z = torch.cat([prompt_bits, torch.full((n_new,), MASK, device=device)])[None]  # (1, T)
    with eval_mode(model):
        for s in range(steps, 0, -1):
            m_now = float(mask_rate(torch.tensor(s / steps), schedule))
            m_next = float(mask_rate(torch.tensor((s - 1) / steps), schedule))
            masked = (z == MASK).cpu()
            if cfg.arch == "patched":  # reveal whole bytes, their bits drawn down the tree
                reveal_bytes = torch.rand(z.shape[0], z.shape[1] // cfg.bits_per_byte, generator=generator)
                reveal = masked & (reveal_bytes < (m_now - m_next) / max(m_now, 1e-12)).repeat_interleave(
                    cfg.bits_per_byte, dim=1)
                values = model.body.sample_bytes(z, temperature=temperature, generator=generator).cpu()
            else:
                logits, _ = model(z, causal=False)
                p_one = (logits.float() / temperature).softmax(-1)[..., 1].cpu()
                reveal = masked & (torch.rand(z.shape, generator=generator) < (m_now - m_next) / max(m_now, 1e-12))
                values = (torch.rand(z.shape, generator=generator) < p_one).long()
            z = torch.where(reveal.to(device), values.to(device), z)
    new_bits = z[0, prompt_bits.numel():].cpu().numpy().astype(np.uint8)
    corrections = 0
    if cfg.parity:
        new_bits, corrections = enforce_parity(new_bits)
    new = bits_to_bytes(new_bits, parity=cfg.parity)
    return Generation(text=(data + new).decode("utf-8", errors="replace"), new_bytes=new,
                      n_parity_corrections=corrections)


def evaluate_elbo(model, batches, *, schedule: str, seed: int = 0) -> dict[str, float]:
    """ELBO bits per byte (an upper bound) over (B, L) byte batches, with seeded masks."""
    generator = torch.Generator().manual_seed(seed)
    elbo_bpb, n_bytes = bits_per_byte_over(
        model, batches, lambda m, batch: diffusion_batch_loss(m, batch, schedule=schedule, generator=generator))
    return {"elbo_bpb": elbo_bpb, "n_bytes": n_bytes}
