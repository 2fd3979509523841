"""Safety gate: calibrated floors on real text, EMA and burn-in, streams, strict mode, bounded retries."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bitlm import safety
from bitlm.codec import bytes_to_bits
from bitlm.config import ModelConfig
from bitlm.data import Corpus
from bitlm.model import BitTransformerLM
from bitlm.safety import (
    SafetyBlocked,
    SafetyConfig,
    SafetyGate,
    complexity_and_symbiosis,
    hil_safe_inference,
    measure,
    safe_sample_with_retry,
)
from bitlm.sampling import generate
from bitlm.telemetry import lz_complexity, symbiosis

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared/data/tinyshakespeare.txt"
LOOP = (b"To be or not to be. " * 26)[:512]
RANDOM = np.random.default_rng(0).integers(0, 256, 512).astype(np.uint8).tobytes()


@pytest.fixture(scope="module")
def shakespeare() -> bytes:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"tinyshakespeare not found at {SHAKESPEARE} (the shared/ folder beside the repo root)")
    return SHAKESPEARE.read_bytes()


@pytest.fixture(scope="module")
def model(shakespeare) -> BitTransformerLM:
    torch.manual_seed(0)
    m = BitTransformerLM(ModelConfig.from_name("tiny", kind="patched")).eval()
    m.set_reference_marginals(Corpus.from_bytes(shakespeare, window_bytes=1024).phase_marginals(True))
    return m


def held_out_windows(data: bytes, n: int) -> list[bytes]:
    """n evenly spaced 512-byte windows from the last 10% of the corpus."""
    tail = data[int(len(data) * 0.9):]
    starts = np.linspace(0, len(tail) // 512 - 1, n).astype(int) * 512
    return [tail[s:s + 512] for s in starts]


def test_default_floors_pass_held_out_shakespeare(model, shakespeare):
    for window in held_out_windows(shakespeare, 12):
        _, verdict = hil_safe_inference(model, bytes_to_bits(window))
        assert verdict.passed, (verdict.reasons, window[:40])
        assert 0.0 <= verdict.K <= 1.0


def test_repetition_loop_is_blocked_by_the_c_floor(model):
    _, verdict = hil_safe_inference(model, torch.as_tensor(bytes_to_bits(LOOP))[None])
    assert not verdict.passed
    assert verdict.C < 0.3 and any(r.startswith("C ") for r in verdict.reasons)


def test_random_bytes_are_blocked_by_the_s_floor(model):
    _, verdict = hil_safe_inference(model, bytes_to_bits(RANDOM))
    assert not verdict.passed
    assert verdict.S < 0.5 and any(r.startswith("S ") for r in verdict.reasons)


def test_hil_safe_inference_returns_the_given_bits(model):
    bits = torch.as_tensor(bytes_to_bits(b"Hello, world!"))[None]
    out, _ = hil_safe_inference(model, bits, c_floor=0.0, s_floor=0.0)
    assert torch.equal(out, bits)


def test_measure_averages_c_and_s_over_512_byte_windows_with_an_end_aligned_tail(model, shakespeare):
    text = shakespeare[-1000:]
    bits = bytes_to_bits(text)
    ref = model.reference_marginals.numpy()
    first, last = bytes_to_bits(text[:512]), bytes_to_bits(text[-512:])
    metrics = measure(model, bits)
    assert metrics["C"] == pytest.approx((lz_complexity(first) + lz_complexity(last)) / 2)
    assert metrics["S"] == pytest.approx((symbiosis(first, ref, 9) + symbiosis(last, ref, 9)) / 2)
    assert 0.0 <= metrics["K"] <= 1.0


def test_sequence_shorter_than_a_window_is_measured_whole(model):
    bits = bytes_to_bits(b"Shall I compare thee to a summer's day?")
    c, s = complexity_and_symbiosis(bits, model.reference_marginals.numpy(), 9)
    assert c == pytest.approx(lz_complexity(bits))
    assert s == pytest.approx(symbiosis(bits, model.reference_marginals.numpy(), 9))


def test_k_reads_sequences_longer_than_the_context_in_windows(model, shakespeare):
    bits = bytes_to_bits(shakespeare[:300])  # 2700 bits; the tiny patched context is 1152
    ids = torch.as_tensor(bits, dtype=torch.long)
    parts = [ids[:1152], ids[1152:2304], ids[2304:]]
    with torch.no_grad():
        ks = [float(model(p[None], return_telemetry=True)[1]["negentropy"][0]) for p in parts]
    expected = sum(k * len(p) for k, p in zip(ks, parts)) / len(ids)
    assert measure(model, bits)["K"] == pytest.approx(expected, rel=1e-5)


def test_byte_baseline_is_measured_on_the_same_bits(model, shakespeare):
    byte_model = BitTransformerLM(ModelConfig.from_name("tiny", kind="byte")).eval()
    byte_model.set_reference_marginals(model.reference_marginals)
    bits = bytes_to_bits(shakespeare[:600])
    got, ref = measure(byte_model, bits), measure(model, bits)
    assert got["C"] == pytest.approx(ref["C"]) and got["S"] == pytest.approx(ref["S"])
    assert 0.0 <= got["K"] <= 1.0
    with pytest.raises(ValueError, match="whole bytes"):
        measure(byte_model, bits[:-1])


def test_measure_rejects_a_batch_of_several_sequences(model):
    with pytest.raises(ValueError, match=r"\(T,\) or \(1, T\)"):
        measure(model, np.zeros((2, 90), dtype=np.uint8))


def test_ema_and_burn_in_follow_a_scripted_sequence():
    gate = SafetyGate(c_floor=0.3, s_floor=0.5, decay=0.75, burn_in=2)
    cs = [0.2, 0.2, 0.8, 0.0, 1.0, 1.0]
    # ema_1 = 0.2; ema_t = 0.75 * ema_{t-1} + 0.25 * c_t
    expected_ema = [0.2, 0.2, 0.35, 0.2625, 0.446875, 0.58515625]
    # observations 1 and 2 are burn-in (n <= 2): their low C is reported but does not block
    expected_pass = [True, True, True, False, True, True]
    verdicts = [gate.observe(0.5, c, 0.9) for c in cs]
    assert [v.C for v in verdicts] == pytest.approx(expected_ema)
    assert [v.raw_C for v in verdicts] == cs
    assert [v.passed for v in verdicts] == expected_pass
    assert [v.armed for v in verdicts] == [False, False, True, True, True, True]
    assert verdicts[0].reasons == ["C 0.200 < floor 0.300"] and verdicts[2].reasons == []
    assert [v.n_observed for v in verdicts] == [1, 2, 3, 4, 5, 6]


def test_without_smoothing_or_burn_in_the_first_bad_observation_blocks():
    verdict = SafetyGate().observe(None, 0.1, 0.9)
    assert not verdict.passed and verdict.K is None


def test_streams_are_isolated():
    gate = SafetyGate(decay=0.9)
    for _ in range(5):
        assert not gate.observe(0.5, 0.05, 0.9, stream="looping").passed
    good = gate.observe(0.5, 0.7, 0.9, stream="clean")
    assert good.passed and good.C == 0.7 and good.n_observed == 1
    assert gate.state("looping")["n_observed"] == 5


def test_reset_clears_one_stream_or_all():
    gate = SafetyGate(decay=0.9)
    gate.observe(0.5, 0.05, 0.9, stream="a")
    gate.observe(0.5, 0.05, 0.9, stream="b")
    gate.reset("a")
    assert gate.state("a") is None and gate.state("b")["n_observed"] == 1
    # after a reset the stream starts over: its first value initialises the EMA again
    assert gate.observe(0.5, 0.8, 0.9, stream="a").C == 0.8
    gate.reset()
    assert gate.state("a") is None and gate.state("b") is None


def test_observe_rejects_nan_and_out_of_range_metrics():
    gate = SafetyGate()
    with pytest.raises(ValueError, match="C must be"):
        gate.observe(0.5, float("nan"), 0.9)
    with pytest.raises(ValueError, match="S must be"):
        gate.observe(0.5, 0.5, 1.5)
    assert gate.state() is None


def test_strict_mode_raises_with_the_verdict_attached(model):
    with pytest.raises(SafetyBlocked, match=r"C 0\.\d+ < floor 0\.300") as info:
        hil_safe_inference(model, bytes_to_bits(LOOP), strict=True)
    verdict = info.value.verdict
    assert not verdict.passed and verdict.c_floor == 0.3
    assert any("floor 0.300" in r for r in verdict.reasons)


def test_a_strict_block_survives_pickling_with_its_verdict(model):
    import pickle

    with pytest.raises(SafetyBlocked) as info:
        hil_safe_inference(model, bytes_to_bits(LOOP), strict=True)
    copy = pickle.loads(pickle.dumps(info.value))  # as Ray sends it from a worker or replica
    assert copy.verdict == info.value.verdict and str(copy) == str(info.value)


def test_a_gate_sets_the_floors_and_refuses_conflicting_ones(model):
    gate = SafetyGate(c_floor=0.05, s_floor=0.5)
    _, verdict = hil_safe_inference(model, bytes_to_bits(LOOP), gate=gate, stream="s")
    assert verdict.passed and gate.state("s")["n_observed"] == 1
    with pytest.raises(ValueError, match="c_floor=0.3 conflicts"):
        hil_safe_inference(model, bytes_to_bits(LOOP), c_floor=0.3, gate=gate)


class RecordingDiffusionSampler:
    """Stand-in for the diffusion sampler (bitlm.diffusion is written separately): it records its calls
    and returns real model output, a causal sample under the seed it was given, so the gate judges
    genuine text; only which sampler produced it differs."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, prompt, max_new_bytes, seed):
        self.calls.append((prompt, max_new_bytes, seed))
        return generate(model, prompt, max_new_bytes, temperature=1.0, seed=1000 + seed).text


def test_retries_are_bounded_and_the_last_one_uses_diffusion(model, monkeypatch):
    sleeps = []
    monkeypatch.setattr(safety.time, "sleep", sleeps.append)
    sampler = RecordingDiffusionSampler()
    gate = SafetyGate(c_floor=1.0, s_floor=1.0)  # C and S both 1.0 at once: no sample can meet them
    text, verdict = safe_sample_with_retry(model, "ROMEO:", 16, max_retries=2, backoff_s=0.5, seed=7,
                                           diffusion_sampler=sampler, gate=gate)
    assert [a["attempt"] for a in verdict.attempts] == [0, 1, 2]
    assert [a["seed"] for a in verdict.attempts] == [7, 8, 9]
    assert [a["mode"] for a in verdict.attempts] == ["causal", "causal", "diffusion"]
    assert not any(a["passed"] for a in verdict.attempts) and not verdict.passed
    assert sampler.calls == [("ROMEO:", 16, 9)]
    assert text == verdict.text == generate(model, "ROMEO:", 16, temperature=1.0, seed=1009).text
    assert sleeps == [0.5, 1.0]
    # rejected attempts stay out of the stream's EMA: only the returned sample was recorded
    assert gate.state()["n_observed"] == 1


def test_strict_retry_raises_after_the_last_attempt(model):
    with pytest.raises(SafetyBlocked) as info:
        safe_sample_with_retry(model, "ROMEO:", 8, max_retries=1, c_floor=1.0, s_floor=1.0, strict=True)
    verdict = info.value.verdict
    assert len(verdict.attempts) == 2 and [a["mode"] for a in verdict.attempts] == ["causal", "causal"]
    assert verdict.text is not None


def test_no_retries_means_one_attempt_even_with_a_diffusion_sampler(model):
    sampler = RecordingDiffusionSampler()
    _, verdict = safe_sample_with_retry(model, "ROMEO:", 8, max_retries=0, c_floor=1.0, s_floor=1.0,
                                        diffusion_sampler=sampler)
    assert len(verdict.attempts) == 1 and sampler.calls == []


def test_zero_floors_pass_on_the_first_attempt(model):
    text, verdict = safe_sample_with_retry(model, "ROMEO:", 16, c_floor=0.0, s_floor=0.0, seed=3)
    assert verdict.passed and len(verdict.attempts) == 1 and verdict.attempts[0]["seed"] == 3
    assert text == generate(model, "ROMEO:", 16, temperature=0.8, seed=3).text


def test_verdict_to_json_is_one_line_with_the_decision(model):
    _, verdict = safe_sample_with_retry(model, "To be\nor not", 8, max_retries=1, c_floor=1.0, s_floor=1.0)
    line = verdict.to_json()
    assert "\n" not in line
    record = json.loads(line)
    for key in ("passed", "K", "C", "S", "c_floor", "s_floor", "attempts", "reasons"):
        assert key in record
    assert record["passed"] is False and len(record["attempts"]) == 2
    assert record == verdict.to_dict()


@pytest.mark.parametrize(("field", "value"), [
    ("c_floor", 1.5), ("s_floor", -0.1), ("decay", 1.0), ("burn_in", -1), ("window_bytes", 0),
    ("max_retries", -1), ("backoff_s", -1.0), ("backoff_s", float("inf")), ("max_retries", 1.5),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"safety\.{field}: must"):
        SafetyConfig(**{field: value})


def test_gate_overrides_validate_like_the_config():
    with pytest.raises(ValueError, match=r"safety\.decay"):
        SafetyGate(SafetyConfig(), decay=2.0)
    assert SafetyGate(SafetyConfig(c_floor=0.2), burn_in=3).config == SafetyConfig(c_floor=0.2, burn_in=3)
