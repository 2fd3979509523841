"""Gated sampling of a batch of requests: causal ones with equal settings decode together, each row with its own seed.

bitlm.sampling.generate_ids draws the rows of a batch from one generator unless it is given
row_seeds; here it always is, so every row has its own torch.Generator and a request gets the
same text alone or batched. Retries are rounds: attempt k of every still-blocked request
runs in round k (seed + k), batched again. Diffusion requests run one after another.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Optional

import torch

from bitlm.codec import bytes_to_bits
from bitlm.diffusion import diffusion_sample
from bitlm.safety import SafetyConfig, SafetyGate, Verdict, measure
from bitlm.sampling import Generation, generate_ids, prompt_ids, to_generation

# float32 turns a smaller temperature into 0 (and x / T into inf or nan); sampling at it is greedy anyway
MIN_TEMPERATURE = 1e-30
# filter_logits compares float32 masses with top_p, where a smaller top_p rounds to 0 and drops every
# value; any top_p below the top value's mass (>= 1/512, the patterns of a patched byte) keeps exactly
# that value, so this changes nothing
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
    sampling_unit: Optional[str] = None  # bitlm.sampling's sampling_unit; None: the model's default

    def batch_key(self) -> tuple:
        """Requests with equal keys decode together in a round (diffusion requests never share one)."""
        if self.mode == "diffusion":
            return ("diffusion", id(self))
        return ("causal", len(self.prompt), self.max_new_bytes, self.temperature, self.top_k, self.top_p,
                self.sampling_unit)


@dataclass
class Outcome:
    verdict: Verdict  # with attempts and the kept (or last) text
    new_bytes: bytes


def sample_causal(model, jobs: list[Job], seeds: list[int]) -> list[Generation]:
    """One batched decode for jobs that share a batch key, each row from its own seed."""
    cfg, first = model.config, jobs[0]
    ids = torch.stack([prompt_ids(cfg, j.prompt) for j in jobs])
    out = generate_ids(model, ids, first.max_new_bytes * cfg.ids_per_byte, temperature=first.temperature,
                       top_k=first.top_k, top_p=first.top_p, row_seeds=seeds,
                       sampling_unit=first.sampling_unit)[:, ids.shape[1]:]
    return [to_generation(cfg, job.prompt, row) for job, row in zip(jobs, out)]


def _sample_round(model, jobs: list[Job], k: int) -> list[Generation]:
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        groups[job.batch_key()].append(i)
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
