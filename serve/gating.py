"""Gated sampling of a batch of requests: causal ones with equal settings decode together, each row with its own seed.

bitlm.sampling.generate draws a whole batch from one generator, so rows of a batch could not
reproduce a single request's sample; here every row has its own torch.Generator, and a request
gets the same text alone or batched. Retries are rounds: attempt k of every still-blocked request
runs in round k (seed + k), batched again. Diffusion requests run one after another.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Optional

import torch

from bitlm.codec import bits_to_bytes, bytes_to_bits, enforce_parity
from bitlm.diffusion import diffusion_sample
from bitlm.safety import SafetyConfig, SafetyGate, Verdict, measure
from bitlm.sampling import Generation, filter_logits

# float32 turns a smaller temperature into 0 (and x / T into inf or nan); sampling at it is greedy anyway
MIN_TEMPERATURE = 1e-30
# filter_logits compares float32 masses with top_p, where a smaller top_p rounds to 0 and drops every
# value; any top_p below the top value's mass (>= 1/256) keeps exactly that value, so this changes nothing
MIN_TOP_P = 1e-6


@dataclass(frozen=True)
class Job:
    """One validated generation request."""

    prompt: bytes
    max_new_bytes: int
    mode: str  # "causal" | "diffusion"
    temperature: float
    top_k: Optional[int]
    top_p: Optional[float]
    diffusion_steps: int
    schedule: str
    seed: int
    c_floor: float
    s_floor: float
    max_retries: int

    def batch_key(self, k: int) -> tuple:
        """Requests with equal keys decode together in round k (diffusion requests never share one)."""
        if self.mode == "diffusion":
            return ("diffusion", id(self))
        return ("causal", len(self.prompt), self.max_new_bytes, self.temperature, self.top_k, self.top_p)


@dataclass
class Outcome:
    verdict: Verdict  # with attempts and the kept (or last) text
    new_bytes: bytes


@torch.no_grad()
def decode_rows(model, ids: torch.Tensor, n_new: int, *, temperature: float, top_k: Optional[int],
                top_p: Optional[float], seeds: list[int]) -> torch.Tensor:
    """Extend (B, T0) ids by n_new ids with the KV cache; row i samples from its own generator seeded seeds[i].

    The context handling is bitlm.sampling.generate_ids': when it fills up, the oldest half is
    dropped on a byte boundary and the rest re-read.
    """
    cfg = model.config
    device = next(model.parameters()).device
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    seq = ids.to(device)
    unit = cfg.ids_per_byte
    keep_bytes = max(1, cfg.max_input_ids // 2 // unit)
    start, state = 0, None
    was_training = model.training
    model.eval()
    try:
        for _ in range(n_new):
            if seq.shape[1] - start > cfg.max_input_ids:
                start = seq.shape[1] - (keep_bytes * unit + seq.shape[1] % unit)
                state = None
            if state is None:
                state, logits = model.start_decoding(seq[:, start:])
            else:
                logits = model.decode_next(state, seq[:, -1])
            scaled = logits.float() / temperature
            if not torch.isfinite(scaled).all():  # a temperature near 0: the same distribution, shifted to max 0
                scaled = (logits.float() - logits.float().amax(-1, keepdim=True)) / temperature
            probs = filter_logits(scaled, top_k=top_k, top_p=top_p).softmax(-1)  # (B, V)
            nxt = torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g)[:, 0] for i, g in enumerate(generators)])
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    finally:
        model.train(was_training)
    return seq


def sample_causal(model, jobs: list[Job], seeds: list[int]) -> list[Generation]:
    """One batched decode for jobs that share a batch key."""
    cfg, first = model.config, jobs[0]
    if cfg.representation == "bit":
        ids = torch.stack([torch.as_tensor(bytes_to_bits(j.prompt, parity=cfg.parity), dtype=torch.long) for j in jobs])
        n_new = first.max_new_bytes * cfg.bits_per_byte
    else:
        ids = torch.stack([torch.as_tensor(list(j.prompt), dtype=torch.long) for j in jobs])
        n_new = first.max_new_bytes
    out = decode_rows(model, ids, n_new, temperature=first.temperature, top_k=first.top_k, top_p=first.top_p,
                      seeds=seeds)[:, ids.shape[1]:].cpu()
    results = []
    for job, row in zip(jobs, out):
        if cfg.representation == "bit":
            bits, corrections = (enforce_parity(row.numpy()) if cfg.parity else (row.numpy(), 0))
            new = bits_to_bytes(bits, parity=cfg.parity)
        else:
            new, corrections = bytes(row.tolist()), 0
        results.append(Generation(text=(job.prompt + new).decode("utf-8", errors="replace"), new_bytes=new,
                                  n_parity_corrections=corrections))
    return results


def _sample_round(model, jobs: list[Job], k: int) -> list[Generation]:
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        groups[job.batch_key(k)].append(i)
    out: list[Optional[Generation]] = [None] * len(jobs)
    for members in groups.values():
        group = [jobs[i] for i in members]
        if group[0].mode == "diffusion":
            job = group[0]
            gens = [diffusion_sample(model, job.prompt, job.max_new_bytes, steps=job.diffusion_steps,
                                     schedule=job.schedule, temperature=job.temperature, seed=job.seed + k)]
        else:
            gens = sample_causal(model, group, [j.seed + k for j in group])
        for i, gen in zip(members, gens):
            out[i] = gen
    return out  # type: ignore[return-value]


def run_gated(model, jobs: list[Job], *, window_bytes: int = 512) -> list[Outcome]:
    """Sample and gate every job, retrying blocked ones (seed + k) up to their max_retries.

    Each request is judged by its own gate (its floors, no smoothing across requests), the way
    safe_sample_with_retry judges one call; attempts are recorded the same way.
    """
    parity = model.config.parity
    attempts: list[list[dict[str, Any]]] = [[] for _ in jobs]
    last: list[Optional[tuple[Generation, Verdict]]] = [None] * len(jobs)
    pending, k = list(range(len(jobs))), 0
    while pending:
        gens = _sample_round(model, [jobs[i] for i in pending], k)
        still = []
        for i, gen in zip(pending, gens):
            job = jobs[i]
            bits = bytes_to_bits(job.prompt + gen.new_bytes, parity=parity)
            metrics = measure(model, bits, window_bytes=window_bytes)
            gate = SafetyGate(SafetyConfig(c_floor=job.c_floor, s_floor=job.s_floor, window_bytes=window_bytes))
            verdict = gate.observe(metrics["K"], metrics["C"], metrics["S"], stream="http")
            attempts[i].append({"attempt": k, "mode": job.mode, "seed": job.seed + k, "passed": verdict.passed,
                                "K": metrics["K"], "C": metrics["C"], "S": metrics["S"], "reasons": verdict.reasons,
                                "n_parity_corrections": gen.n_parity_corrections})
            last[i] = (gen, verdict)
            if not verdict.passed and k < job.max_retries:
                still.append(i)
        pending, k = still, k + 1
    outcomes = []
    for i, (gen, verdict) in enumerate(last):  # type: ignore[misc]
        outcomes.append(Outcome(verdict=dataclasses.replace(verdict, attempts=attempts[i], text=gen.text),
                                new_bytes=gen.new_bytes))
    return outcomes


def run_gated_isolated(model, jobs: list[Job], *, window_bytes: int = 512) -> list[Outcome | Exception]:
    """run_gated over the batch; if it raises, each job again on its own.

    A batch shares one forward pass, so one job that fails would otherwise fail every caller in
    its batch. On failure every job is rerun alone (results are per-job seeded, so the good ones
    get exactly what the batch would have given them) and the failing jobs get their exception
    in place of an outcome, for their own caller to report.
    """
    try:
        return list(run_gated(model, jobs, window_bytes=window_bytes))
    except Exception:
        if len(jobs) == 1:
            raise
    outcomes: list[Outcome | Exception] = []
    for job in jobs:
        try:
            outcomes.append(run_gated(model, [job], window_bytes=window_bytes)[0])
        except Exception as exc:  # noqa: BLE001 - handed to that job's caller, who raises it
            outcomes.append(exc)
    return outcomes
