"""Masked diffusion over bits: schedules, the ELBO estimator, the sampler, training through fit."""

import dataclasses
import math
import warnings

import pytest
import torch

from bitlm.codec import bits_to_bytes, bytes_to_bits
from bitlm.config import DiffusionConfig, ExperimentConfig, ModelConfig, TrainConfig
from bitlm.data import Corpus
from bitlm.diffusion import (NOISE_SCHEDULES, diffusion_batch_loss, diffusion_sample, evaluate_elbo, mask_rate, mask_rate_derivative,
                             masked_count_distribution, sample_masked_counts)
from bitlm.engine import MetricDriftWarning, fit
from bitlm.validation import drift as _drift
from bitlm.model import BitTransformerLM
from bitlm.objective import LossOutput, telemetry_penalty

TEXT = b"the quick brown fox jumps over the lazy dog. " * 40 + b"pack my box with five dozen liquor jugs! " * 40


def make(arch="patched", **overrides):
    torch.manual_seed(0)
    return BitTransformerLM(ModelConfig.from_name("tiny", kind=arch, causal=False, **overrides)).eval()


@pytest.mark.parametrize("schedule", NOISE_SCHEDULES)
def test_mask_rate_is_monotone_in_unit_range_and_hits_its_end_points(schedule):
    t = torch.linspace(0, 1, 1001)
    m = mask_rate(t, schedule)
    assert float(m[0]) == pytest.approx(0.0, abs=1e-6) and float(m[-1]) == pytest.approx(1.0, abs=1e-6)
    assert bool((m.diff() >= -1e-7).all()) and float(m.min()) >= 0.0 and float(m.max()) <= 1.0


@pytest.mark.parametrize("schedule", NOISE_SCHEDULES)
def test_mask_rate_derivative_matches_finite_differences(schedule):
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-5
    numeric = (mask_rate(t + h, schedule) - mask_rate(t - h, schedule)) / (2 * h)
    torch.testing.assert_close(mask_rate_derivative(t, schedule), numeric, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("schedule", NOISE_SCHEDULES)
def test_every_schedule_weights_k_masked_units_by_one_over_k(schedule):
    # the identity behind the count form: integral of w(t) Binomial(k; n, m(t)) dt = 1/k
    n, steps = 6, 200_000
    t = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    m, w = mask_rate(t, schedule), mask_rate_derivative(t, schedule)
    for k in range(1, n + 1):
        binomial = math.comb(n, k) * m ** k * (1 - m) ** (n - k)
        assert float((w / m * binomial).mean()) == pytest.approx(1 / k, rel=2e-3)


@pytest.mark.parametrize("schedule", NOISE_SCHEDULES)
def test_masked_count_distribution_is_a_distribution_over_one_to_n(schedule):
    p = masked_count_distribution(64, schedule)
    assert p.shape == (64,) and float(p.min()) > 0 and float(p.sum()) == pytest.approx(1.0, abs=1e-9)
    if schedule == "linear":  # m = t: every count 0..n is equally likely
        torch.testing.assert_close(p, torch.full((64,), 1 / 64, dtype=torch.float64), rtol=1e-4, atol=0)


def test_sampled_counts_follow_the_distribution_and_carry_their_weights():
    gen = torch.Generator().manual_seed(0)
    k, w = sample_masked_counts(20_000, 8, schedule="cosine", generator=gen)
    p = masked_count_distribution(8, "cosine")
    freq = torch.bincount(k - 1, minlength=8).double() / k.numel()
    torch.testing.assert_close(freq, p, atol=2e-3, rtol=0)  # stratified: close to exact frequencies
    torch.testing.assert_close(w.double(), 1 / (k.double() * p[k - 1]), rtol=1e-5, atol=0)
    early, _ = sample_masked_counts(20_000, 8, schedule="cosine", generator=gen, curriculum=True, progress=0.0)
    assert float(early.double().mean()) > float(k.double().mean())  # the curriculum starts noisy


def test_the_estimator_is_unbiased_for_the_bound_enumerated_over_every_masked_set():
    # 4 bytes: the bound sum_k (1/k) E_{|M|=k}[sum_{i in M} -log p(x_i | z_M)] over all 15 masked sets
    model = make()
    window = torch.as_tensor(list(b"to b"), dtype=torch.uint8)[None]
    bits = torch.as_tensor(bytes_to_bits(b"to b"), dtype=torch.long)[None]
    subsets = [s for s in range(1, 16)]
    exact = 0.0
    with torch.no_grad():
        for k in range(1, 5):
            sets = [s for s in subsets if bin(s).count("1") == k]
            total = 0.0
            for s in sets:
                masked = torch.tensor([(s >> i) & 1 for i in range(4)], dtype=torch.bool).repeat_interleave(9)[None]
                logits, _ = model(torch.where(masked, torch.full_like(bits, 2), bits), causal=False, local_prefix=bits)
                nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 2), bits.reshape(-1), reduction="none")
                total += float((nll * masked.reshape(-1)).sum()) / math.log(2)
            exact += total / len(sets) / k
        out = diffusion_batch_loss(model, window.repeat(4000, 1), schedule="cosine", generator=torch.Generator().manual_seed(1))
    assert float(out.nll_bits) / 4000 == pytest.approx(exact, rel=0.02)


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="noise schedule"):
        mask_rate(torch.tensor([0.5]), "quadratic")


@pytest.mark.parametrize("schedule", NOISE_SCHEDULES)
def test_elbo_of_a_coin_flip_model_is_nine_bits_per_byte(schedule):
    # p = 0.5 everywhere: every masked bit costs ln 2 and E[w(t) m(t)] = 1, so the bound is 1 bit per bit
    model = make()
    for p in (model.body.node_vectors.weight, model.body.node_bias.weight):
        torch.nn.init.zeros_(p)
    batch = torch.randint(0, 256, (512, 32), dtype=torch.uint8)  # byte-level masking: large sample
    out = evaluate_elbo(model, [batch], schedule=schedule, seed=0)
    assert out["elbo_bpb"] == pytest.approx(9.0, rel=0.06)


class _Oracle(torch.nn.Module):
    """A perfectly informed denoiser: it knows the clean bits and predicts them with certainty."""

    def __init__(self, clean_bits, config):
        super().__init__()
        self.config, self.clean = config, clean_bits
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, causal=None, **unused):
        logits = torch.stack([-30.0 * self.clean, 30.0 * self.clean - 30.0 * (1 - self.clean)], dim=-1).float()
        return logits - logits.logsumexp(-1, keepdim=True) + 0 * self.anchor, {}


def test_elbo_is_finite_and_at_least_that_of_a_perfectly_informed_denoiser():
    model = make()
    batch = torch.as_tensor(list(TEXT[:64 * 4]), dtype=torch.uint8).view(4, 64)
    gen = torch.Generator().manual_seed(0)
    learned = diffusion_batch_loss(model, batch, schedule="cosine", generator=gen)
    clean = torch.as_tensor(bytes_to_bits(TEXT[:256]), dtype=torch.float32).view(4, -1)
    oracle = diffusion_batch_loss(_Oracle(clean, model.config), batch, schedule="cosine",
                            generator=torch.Generator().manual_seed(0))
    assert math.isfinite(float(learned.nll_bits)) and math.isfinite(float(learned.loss.detach()))
    assert float(oracle.nll_bits) == pytest.approx(0.0, abs=1e-3)
    assert float(learned.nll_bits) >= float(oracle.nll_bits)


@pytest.mark.parametrize("arch", ["flat", "patched"])
@pytest.mark.parametrize("parity", [True, False])
def test_sampling_keeps_the_prompt_and_returns_whole_bytes_with_valid_parity(arch, parity):
    model = make(arch, parity=parity)
    out = diffusion_sample(model, "To be", 12, steps=8, schedule="cosine", seed=0)
    assert out.text.startswith("To be")
    assert len(out.new_bytes) == 12
    bits = bytes_to_bits(out.new_bytes, parity=parity)
    assert bits_to_bytes(bits, parity=parity) == out.new_bytes  # strict: every parity bit holds
    assert out.n_parity_corrections >= 0


def test_sampling_is_reproducible_with_a_seed():
    model = make()
    a = diffusion_sample(model, "ab", 8, steps=4, seed=3)
    b = diffusion_sample(model, "ab", 8, steps=4, seed=3)
    assert a.new_bytes == b.new_bytes


def test_diffusion_refuses_causal_and_chunked_models():
    with pytest.raises(ValueError, match="non-causal"):
        diffusion_sample(BitTransformerLM(ModelConfig.from_name("tiny")), "a", 2)
    with pytest.raises(ValueError, match="chunk"):
        diffusion_sample(make("flat", chunk_size=16), "a", 2)


def test_sampling_longer_than_the_context_is_rejected():
    with pytest.raises(ValueError, match="takes"):
        diffusion_sample(make(max_positions=8), "abc", 6)


@pytest.mark.parametrize("arch", ["flat", "patched"])
def test_fit_trains_a_diffusion_model_and_reports_the_elbo(arch):
    corpus = Corpus.from_bytes(TEXT, window_bytes=64, val_fraction=0.2)
    model = make(arch, max_positions=144 if arch == "flat" else 16)
    cfg = TrainConfig(batch_size=8, context_bytes=16, max_steps=30, warmup_steps=2, log_every=1, eval_every=30,
                      eval_batches=2)
    logs = []
    result = fit(model, corpus, ExperimentConfig(model=model.config, train=cfg,
                                                 diffusion=DiffusionConfig(noise_schedule="linear", curriculum=True)),
                 report=lambda m, c: logs.append(m))
    assert "val/elbo_bpb" in result.metrics and "val/bpb" not in result.metrics
    assert 0 < result.metrics["val/elbo_bpb"] < 20
    curve = [m["train/loss"] for m in logs if "train/loss" in m]
    assert sum(curve[-5:]) < sum(curve[:5])


def test_telemetry_penalty_is_zero_when_off_and_differentiable_when_on():
    p = torch.rand(2, 45, requires_grad=True)
    out = LossOutput(loss=torch.zeros(()), nll_bits=torch.zeros(()), n_bytes=10, p_one=p)
    assert telemetry_penalty(out, torch.full((9,), 0.5), 9, lambda_k=0, lambda_c=0, lambda_s=0) is None
    penalty = telemetry_penalty(out, torch.full((9,), 0.3), 9, lambda_k=0.1, lambda_c=0.1, lambda_s=0.1)
    penalty.backward()
    assert float(penalty.detach()) > 0 and p.grad is not None and bool(torch.isfinite(p.grad).all())


def test_fit_with_telemetry_regularisers_runs():
    corpus = Corpus.from_bytes(TEXT, window_bytes=64, val_fraction=0.2)
    model = BitTransformerLM(ModelConfig.from_name("tiny", kind="patched"))
    cfg = TrainConfig(batch_size=4, context_bytes=16, max_steps=4, eval_every=4, eval_batches=1,
                      lambda_k=0.1, lambda_c=0.1, lambda_s=0.1)
    assert math.isfinite(fit(model, corpus, cfg).metrics["val/bpb"])


def test_a_drift_beyond_the_threshold_warns_naming_the_metric():
    cfg = TrainConfig(drift_window=2, drift_threshold=0.2)
    history = [{"val/K": 0.5, "val/C": 0.7, "val/S": 0.9}] * 2 + [{"val/K": 0.5, "val/C": 0.2, "val/S": 0.9}] * 2
    with pytest.warns(MetricDriftWarning, match="val/C"):
        deltas = _drift(history, cfg)
    assert deltas == {"drift/val/C": pytest.approx(-0.5)}


def test_a_rise_of_the_models_telemetry_is_logged_but_does_not_warn():
    cfg = TrainConfig(drift_window=2, drift_threshold=0.2)
    history = [{"val/K": 0.5, "val/C": 0.7, "val/S": 0.1}] * 2 + [{"val/K": 0.5, "val/C": 0.7, "val/S": 0.8}] * 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", MetricDriftWarning)
        deltas = _drift(history, cfg)
    assert deltas == {"drift/val/S": pytest.approx(0.7)}


def test_a_stable_history_does_not_warn():
    cfg = TrainConfig(drift_window=2, drift_threshold=0.2)
    history = [{"val/K": 0.5 + 0.01 * (i % 2), "val/C": 0.7, "val/S": 0.9} for i in range(6)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", MetricDriftWarning)
        assert _drift(history, cfg) == {}


def test_patched_diffusion_masks_whole_bytes_and_scores_them_down_the_tree():
    model = make("patched")
    seen = []
    original = model.forward

    def spy(x, **kwargs):
        seen.append((x.clone(), kwargs.get("local_prefix")))
        return original(x, **kwargs)

    model.forward = spy
    batch = torch.as_tensor(list(TEXT[:64]), dtype=torch.uint8).view(2, 32)
    diffusion_batch_loss(model, batch, schedule="linear", generator=torch.Generator().manual_seed(1))
    x, prefix = seen[0]
    per_byte = (x == 2).view(2, 32, 9)
    assert bool((per_byte.all(-1) | ~per_byte.any(-1)).all())  # a byte is masked entirely or not at all
    assert per_byte.any() and prefix is not None


def _bits_per_masked_byte(model, windows: torch.Tensor, rate: float, seed: int = 0) -> float:
    gen = torch.Generator().manual_seed(seed)
    bits = torch.as_tensor(bytes_to_bits(windows.numpy().tobytes()), dtype=torch.long).view(windows.shape[0], -1)
    masked = (torch.rand(windows.shape, generator=gen) < rate).repeat_interleave(9, dim=1)
    with torch.no_grad():
        logits, _ = model(torch.where(masked, torch.full_like(bits, 2), bits), causal=False, local_prefix=bits)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 2), bits.reshape(-1), reduction="none")
    return float((nll * masked.reshape(-1)).sum()) / math.log(2) / (int(masked.sum()) // 9)


def test_a_diffusion_model_learns_masked_bytes_from_their_neighbours():
    # a random walk over 4 letters: alone a byte costs 2 bits; its two neighbours leave at most 1
    rng = torch.Generator().manual_seed(0)
    walk = (torch.randint(0, 2, (4096,), generator=rng) * 2 - 1).cumsum(0) % 4
    text = bytes((b"acgt"[int(i)] for i in walk))
    corpus = Corpus.from_bytes(text, window_bytes=64, val_fraction=0.1)
    model = make(max_positions=32).train()
    cfg = TrainConfig(batch_size=16, context_bytes=32, max_steps=150, warmup_steps=10, lr=3e-3, log_every=50,
                      eval_every=150, eval_batches=1)
    fit(model, corpus, ExperimentConfig(model=model.config, train=cfg, diffusion=DiffusionConfig(noise_schedule="linear")))
    val = next(corpus.val.sequential_batches(8, 32))
    assert _bits_per_masked_byte(model.eval(), val, rate=0.1) < 1.3


def test_only_non_causal_patched_models_carry_the_neighbour_convolution():
    causal = BitTransformerLM(ModelConfig.from_name("tiny", kind="patched"))
    assert not any("neighbour_mix" in k for k in causal.state_dict())
    assert any("neighbour_mix" in k for k in make().state_dict())
    with pytest.raises(ValueError, match="causal=False"):
        causal.body.encode_noncausal(torch.zeros(1, 2, 9, dtype=torch.long))
