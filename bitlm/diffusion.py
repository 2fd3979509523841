"""Masked (absorbing-state) diffusion over bits: noise schedules, the ELBO objective and the sampler.

Forward process: at time t in [0, 1] every bit (flat model) or every byte, all its bits at once
(patched model), is independently replaced by MASK with probability m(t), a schedule rising from
m(0) = 0 to m(1) = 1. The patched model scores a masked byte's bits down its causal tree given
the byte's earlier clean bits, so its per-byte term is -log p(byte) exactly; a flat model
predicts masked bits independently, and its bound pays for the dependence between them. The model, run non-causally, predicts each clean
bit from the partly masked sequence. With w(t) = m'(t) / m(t), the continuous-time bound

    -log p(x) <= E_{t ~ U(0,1)} [ w(t) * sum_{i masked at t} -log p(x_i | z_t) ]

holds for any such schedule (the schedule changes the estimator's variance, not the bound). In
bits and divided by the number of bytes it is the ELBO bpb reported beside causal bpb: an upper
bound on the model's true bits per byte, so the comparison is conservative for diffusion.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .codec import bits_to_bytes, bytes_to_bit_tensor, bytes_to_bits, enforce_parity
from .model import MASK
from .objective import LN2, LossOutput, bits_per_byte_over
from .sampling import Generation

SCHEDULES: tuple[str, ...] = ("linear", "cosine", "exp", "loglinear")  # config.NoiseSchedule
_EXP_RATE = 5.0  # "exp": masks quickly early, m(t) = (1 - e^{-5t}) / (1 - e^{-5})
_LOGIT_SPAN = 6.0  # "loglinear": log-odds of the mask rate linear in t, from -6 to +6, rescaled to [0, 1]
_T_MIN = 1e-4  # t is drawn from [T_MIN, 1]: w(t) ~ 1/t diverges at 0 while the masked set vanishes


def _check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"noise schedule: unknown {schedule!r}; choose from {list(SCHEDULES)}")


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


def sample_times(batch_size: int, *, generator: torch.Generator, progress: float = 1.0,
                 curriculum: bool = False, stratified: bool = False) -> torch.Tensor:
    """Diffusion times for a batch, in [T_MIN, 1].

    stratified: one draw per 1/B stratum (a lower-variance estimate, used for evaluation).
    curriculum: t = u^gamma with gamma rising from 0.25 to 1 over training, so early steps see
    mostly heavy noise; the training loss is then a reweighted objective, not the ELBO itself.
    """
    u = torch.rand(batch_size, generator=generator)
    if stratified:
        u = (torch.arange(batch_size) + u) / batch_size
    if curriculum:
        u = u ** (0.25 + 0.75 * min(max(progress, 0.0), 1.0))
    return _T_MIN + (1.0 - _T_MIN) * u


def diffusion_loss(model, byte_windows: torch.Tensor, *, schedule: str, generator: torch.Generator,
                   progress: float = 1.0, curriculum: bool = False, stratified: bool = False) -> LossOutput:
    """The ELBO of a (B, L) byte batch under a non-causal model, with one diffusion time per row.

    loss: the ELBO in nats per bit (what training minimises); nll_bits: the summed ELBO in bits,
    an upper bound on the batch's negative log2-likelihood; n_bytes: every byte of the batch.
    """
    _check_diffusion_model(model)
    device = next(model.parameters()).device
    bits = bytes_to_bit_tensor(byte_windows.to(device), parity=model.config.parity)  # (B, T)
    B, T = bits.shape
    t = sample_times(B, generator=generator, progress=progress, curriculum=curriculum, stratified=stratified)
    m = mask_rate(t, schedule).to(device)
    weight = (mask_rate_derivative(t, schedule) / mask_rate(t, schedule).clamp_min(1e-12)).to(device)  # (B,)
    byte_level = model.config.arch == "patched"
    bpb = model.config.bits_per_byte
    if byte_level:
        # whole bytes are masked and their bits scored down the causal tree: the byte term is exact
        masked = (torch.rand(B, T // bpb, generator=generator).to(device) < m[:, None]).repeat_interleave(bpb, dim=1)
    else:
        masked = torch.rand(B, T, generator=generator).to(device) < m[:, None]
    logits, _ = model(torch.where(masked, torch.full_like(bits, MASK), bits), causal=False,
                      **({"local_prefix": bits} if byte_level else {}))
    nll = F.cross_entropy(logits.float().reshape(-1, 2), bits.reshape(-1), reduction="none").view(B, T)
    per_row = (nll * masked).sum(dim=1) * weight  # nats, an unbiased estimate of each row's bound
    return LossOutput(loss=per_row.sum() / (B * T), nll_bits=per_row.detach().sum() / LN2,
                      n_bytes=B * byte_windows.shape[1], p_one=logits.float().softmax(-1)[..., 1])


def _check_diffusion_model(model) -> None:
    if model.config.causal:
        raise ValueError("diffusion needs a non-causal model (model.causal=False)")
    if model.config.chunk_size is not None:
        raise ValueError("model.chunk_size: chunked attention is off in diffusion mode; set it to None")
    if model.config.representation != "bit":
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
    _check_diffusion_model(model)
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
    was_training = model.training
    model.eval()
    try:
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
    finally:
        model.train(was_training)
    new_bits = z[0, prompt_bits.numel():].cpu().numpy().astype(np.uint8)
    corrections = 0
    if cfg.parity:
        new_bits, corrections = enforce_parity(new_bits)
    new = bits_to_bytes(new_bits, parity=cfg.parity)
    return Generation(text=(data + new).decode("utf-8", errors="replace"), new_bytes=new,
                      n_parity_corrections=corrections)


def evaluate_elbo(model, batches, *, schedule: str, seed: int = 0) -> dict[str, float]:
    """ELBO bits per byte (an upper bound) over (B, L) byte batches, with stratified, seeded times."""
    generator = torch.Generator().manual_seed(seed)
    elbo_bpb, n_bytes = bits_per_byte_over(
        model, batches, lambda m, batch: diffusion_loss(m, batch, schedule=schedule, generator=generator, stratified=True))
    return {"elbo_bpb": elbo_bpb, "n_bytes": n_bytes}
