"""Masked diffusion over bits: schedules, the ELBO estimator, the sampler, training through fit."""

import dataclasses
import math
import warnings

import pytest
import torch

from bitlm.codec import bits_to_bytes, bytes_to_bits
from bitlm.config import DiffusionConfig, ModelConfig, TrainConfig
from bitlm.data import Corpus
from bitlm.diffusion import SCHEDULES, diffusion_loss, diffusion_sample, evaluate_elbo, mask_rate, mask_rate_derivative
from bitlm.engine import MetricDriftWarning, _drift, fit
from bitlm.model import BitTransformerLM
from bitlm.objective import LossOutput, telemetry_penalty

TEXT = b"the quick brown fox jumps over the lazy dog. " * 40 + b"pack my box with five dozen liquor jugs! " * 40


def make(arch="patched", **overrides):
    torch.manual_seed(0)
    return BitTransformerLM(ModelConfig.from_name("tiny", kind=arch, causal=False, **overrides)).eval()


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_mask_rate_is_monotone_in_unit_range_and_hits_its_end_points(schedule):
    t = torch.linspace(0, 1, 1001)
    m = mask_rate(t, schedule)
    assert float(m[0]) == pytest.approx(0.0, abs=1e-6) and float(m[-1]) == pytest.approx(1.0, abs=1e-6)
    assert bool((m.diff() >= -1e-7).all()) and float(m.min()) >= 0.0 and float(m.max()) <= 1.0


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_mask_rate_derivative_matches_finite_differences(schedule):
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-5
    numeric = (mask_rate(t + h, schedule) - mask_rate(t - h, schedule)) / (2 * h)
    torch.testing.assert_close(mask_rate_derivative(t, schedule), numeric, rtol=1e-4, atol=1e-6)


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="noise schedule"):
        mask_rate(torch.tensor([0.5]), "quadratic")


@pytest.mark.parametrize("schedule", SCHEDULES)
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
    learned = diffusion_loss(model, batch, schedule="cosine", generator=gen)
    clean = torch.as_tensor(bytes_to_bits(TEXT[:256]), dtype=torch.float32).view(4, -1)
    oracle = diffusion_loss(_Oracle(clean, model.config), batch, schedule="cosine",
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
        diffusion_sample(make(max_seq_len=8), "abc", 6)


@pytest.mark.parametrize("arch", ["flat", "patched"])
def test_fit_trains_a_diffusion_model_and_reports_the_elbo(arch):
    corpus = Corpus.from_bytes(TEXT, window_bytes=64, val_fraction=0.2)
    model = make(arch, max_seq_len=144 if arch == "flat" else 16)
    cfg = TrainConfig(batch_size=8, context_bytes=16, max_steps=30, warmup_steps=2, log_every=1, eval_every=30,
                      eval_batches=2)
    logs = []
    result = fit(model, corpus, cfg, diffusion=DiffusionConfig(noise_schedule="linear", curriculum=True),
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
    diffusion_loss(model, batch, schedule="linear", generator=torch.Generator().manual_seed(1))
    x, prefix = seen[0]
    per_byte = (x == 2).view(2, 32, 9)
    assert bool((per_byte.all(-1) | ~per_byte.any(-1)).all())  # a byte is masked entirely or not at all
    assert per_byte.any() and prefix is not None
