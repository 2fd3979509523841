"""Tests for bitlm.telemetry: K, C and S, their differentiable proxies, and drift detection."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bitlm.codec import bytes_to_bits, text_to_bits
from bitlm.telemetry import (
    bernoulli_kl,
    detect_metric_drift,
    lz76_phrase_count,
    lz_complexity,
    lz_complexity_batch,
    lz_complexity_proxy,
    negentropy,
    phase_marginals,
    symbiosis,
    symbiosis_proxy,
    telemetry_summary,
)

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"


def _bits(s: str) -> np.ndarray:
    return np.array([int(ch) for ch in s], dtype=np.uint8)


@pytest.mark.parametrize(
    ("sequence", "expected"),
    [
        ("0001101001000101", 6),  # Kaspar & Schuster: 0.001.10.100.1000.101
        ("0", 1),
        ("01", 2),
        ("0000", 2),  # 0.000
        ("0101", 3),  # 0.1.01
        ("0110", 3),  # 0.1.10
        ("1001", 3),  # 1.0.01
    ],
)
def test_lz76_phrase_count_on_hand_checked_sequences(sequence, expected):
    assert lz76_phrase_count(_bits(sequence)) == expected


def test_lz76_phrase_count_of_empty_sequence_is_zero():
    assert lz76_phrase_count(np.zeros(0, dtype=np.uint8)) == 0


def test_lz76_rejects_non_binary_values():
    with pytest.raises(ValueError, match=r"index 2 has value 5"):
        lz76_phrase_count([0, 1, 5])


def test_lz_complexity_of_all_zero_bits_is_near_zero():
    c = lz_complexity(np.zeros(4608, dtype=np.uint8))
    assert c < 0.02
    assert c == pytest.approx(2 * math.log2(4608) / 4608)


def test_lz_complexity_of_uniform_random_bits_is_near_one():
    bits = np.random.default_rng(0).integers(0, 2, 4608)
    assert lz_complexity(bits) > 0.9


def test_lz_complexity_of_short_sequences_is_zero():
    assert lz_complexity([]) == 0.0
    assert lz_complexity([1]) == 0.0


def test_lz_complexity_batch_matches_rows():
    rng = np.random.default_rng(1)
    batch = np.stack([np.zeros(900, dtype=np.uint8), rng.integers(0, 2, 900).astype(np.uint8)])
    result = lz_complexity_batch(torch.from_numpy(batch))
    assert result.shape == (2,) and result.dtype == np.float64
    assert result.tolist() == [lz_complexity(batch[0]), lz_complexity(batch[1])]


def test_negentropy_of_coin_flip_predictions_is_zero():
    k = negentropy(torch.full((3, 50), 0.5))
    assert k.shape == (3,)
    assert torch.allclose(k, torch.zeros(3), atol=1e-6)


def test_negentropy_of_certain_predictions_is_one():
    p = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    assert negentropy(p).item() == pytest.approx(1.0, abs=1e-5)


def test_negentropy_is_differentiable():
    p = torch.full((2, 8), 0.3, requires_grad=True)
    negentropy(p).sum().backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_lz_proxy_is_high_for_random_predictions():
    p = torch.rand(4, 512, generator=torch.Generator().manual_seed(0))
    proxy = lz_complexity_proxy(p)
    assert proxy.shape == (4,)
    assert torch.all(proxy > 0.6)


def test_lz_proxy_is_low_for_a_confident_periodic_sequence():
    period = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    p = period.repeat(40).unsqueeze(0)
    assert lz_complexity_proxy(p).item() < 0.1


def test_lz_proxy_gradients_flow():
    p = torch.rand(2, 200, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    lz_complexity_proxy(p).sum().backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_lz_proxy_matches_per_lag_definition():
    p = torch.rand(3, 150, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    m = torch.stack(
        [2 * (p[:, lag:] * (1 - p[:, :-lag]) + p[:, :-lag] * (1 - p[:, lag:])).mean(dim=1) for lag in range(1, 11)],
        dim=1,
    )
    expected = (-0.2 * torch.logsumexp(-m / 0.2, dim=1)).clamp(0, 1)
    assert torch.allclose(lz_complexity_proxy(p, max_lag=10, temperature=0.2), expected, atol=1e-12)


def test_lz_proxy_skips_lags_beyond_sequence():
    p = torch.full((1, 5), 0.5)
    # Only lags 1..4 exist; with m = 1 for each the soft minimum is 1 - 0.05 * ln(4).
    assert lz_complexity_proxy(p).item() == pytest.approx(1 - 0.05 * math.log(4), abs=1e-6)


def test_bernoulli_kl_agrees_between_numpy_and_torch():
    q, r = np.array([0.2, 0.5, 0.9]), np.array([0.3, 0.5, 0.1])
    np.testing.assert_allclose(bernoulli_kl(torch.tensor(q), torch.tensor(r)).numpy(), bernoulli_kl(q, r))
    assert bernoulli_kl(q, r)[1] == 0.0


def test_phase_marginals_are_laplace_smoothed_per_phase():
    bits = np.tile(np.array([1, 0, 1], dtype=np.uint8), 4)  # four ones at phases 0 and 2
    np.testing.assert_allclose(phase_marginals(bits, 3), [5 / 6, 1 / 6, 5 / 6])


def test_phase_marginals_pool_over_batch():
    bits = np.array([[1, 1], [0, 0]], dtype=np.uint8)
    np.testing.assert_allclose(phase_marginals(bits, 2), [0.5, 0.5])


def test_symbiosis_is_one_when_smoothed_marginals_match_reference():
    # 8 bytes of 9 bits: phase j holds j ones, so q_j = (j + 1) / 10.
    bits = (np.arange(8)[:, None] < np.arange(9)[None, :]).astype(np.uint8).reshape(-1)
    reference = (np.arange(9) + 1) / 10
    assert symbiosis(bits, reference, 9) == pytest.approx(1.0)
    batch = symbiosis(np.stack([bits, bits]), reference, 9)
    assert batch.shape == (2,) and np.allclose(batch, 1.0)


def test_symbiosis_drops_when_marginals_differ():
    reference = np.full(9, 0.5)
    assert symbiosis(np.zeros(90, dtype=np.uint8), reference, 9) < 0.05


def test_symbiosis_rejects_reference_of_wrong_length_or_range():
    with pytest.raises(ValueError, match=r"expected bits_per_byte=9"):
        symbiosis(np.zeros(18, dtype=np.uint8), np.full(8, 0.5), 9)
    with pytest.raises(ValueError, match=r"phase 3 has value 0.0"):
        symbiosis(np.zeros(18, dtype=np.uint8), np.array([0.5] * 3 + [0.0] + [0.5] * 5), 9)


def test_symbiosis_proxy_is_one_when_predictions_match_reference():
    reference = torch.linspace(0.1, 0.9, 9, dtype=torch.float64)
    p = reference.repeat(2, 16)
    s = symbiosis_proxy(p, reference, 9)
    assert s.shape == (2,)
    assert torch.allclose(s, torch.ones(2, dtype=torch.float64))


def test_symbiosis_proxy_is_differentiable():
    p = torch.full((1, 36), 0.3, requires_grad=True)
    symbiosis_proxy(p, torch.full((9,), 0.6), 9).sum().backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_telemetry_summary_returns_float_vectors_per_sequence():
    bits = torch.from_numpy(np.stack([text_to_bits("a" * 32), text_to_bits("b" * 32)]).astype(np.int64))
    p_one = torch.full(bits.shape, 0.5)
    reference = phase_marginals(bits, 9)
    summary = telemetry_summary(bits, p_one, reference, 9)
    assert set(summary) == {"negentropy", "lz_complexity", "symbiosis"}
    for value in summary.values():
        assert value.shape == (2,) and value.dtype == torch.float32
    assert torch.allclose(summary["negentropy"], torch.zeros(2), atol=1e-6)
    assert torch.all(summary["lz_complexity"] < 0.2)


def test_drift_reports_step_change_with_name_and_sign():
    history = [{"loss": 1.0, "acc": 0.5} for _ in range(100)] + [{"loss": 0.5, "acc": 0.5} for _ in range(100)]
    drift = detect_metric_drift(history, window=100, threshold=0.2)
    assert drift == {"loss": pytest.approx(-0.5)}


def test_drift_ignores_stable_noisy_history():
    rng = np.random.default_rng(3)
    history = [{"loss": float(v)} for v in 2.0 + 0.3 * rng.standard_normal(400)]
    assert detect_metric_drift(history, window=100, threshold=0.2) == {}


def test_drift_needs_two_full_windows():
    history = [{"loss": 0.0}] * 150 + [{"loss": 5.0}] * 49
    assert detect_metric_drift(history, window=100) == {}


def test_drift_validates_arguments():
    with pytest.raises(ValueError, match=r"window must be an integer >= 1"):
        detect_metric_drift([], window=0)
    with pytest.raises(ValueError, match=r"threshold must be >= 0"):
        detect_metric_drift([], threshold=-0.1)


@pytest.fixture(scope="module")
def shakespeare():
    if not CORPUS.is_file():
        pytest.skip(f"calibration corpus not found at {CORPUS} (the shared/ folder beside the repo root)")
    raw = CORPUS.read_bytes()
    cut = int(len(raw) * 0.9)
    return raw[cut:], phase_marginals(bytes_to_bits(raw[:cut]), 9)


def test_calibration_held_out_shakespeare(shakespeare):
    held_out, reference = shakespeare
    offsets = np.linspace(0, len(held_out) - 512, 5).astype(int)
    windows = np.stack([bytes_to_bits(held_out[o : o + 512]) for o in offsets])
    c = lz_complexity_batch(windows)
    s = symbiosis(windows, reference, 9)
    assert np.all((c >= 0.55) & (c <= 0.80)), c
    assert np.all((s >= 0.8) & (s <= 1.0)), s


def test_calibration_repeated_sentence_has_low_complexity():
    bits = bytes_to_bits((b"To be, or not to be, that is the question. " * 12)[:512])
    assert lz_complexity(bits) < 0.15


def test_calibration_random_bytes(shakespeare):
    _, reference = shakespeare
    rng = np.random.default_rng(4)
    windows = np.stack([bytes_to_bits(rng.integers(0, 256, 512, dtype=np.uint8)) for _ in range(3)])
    assert np.all(symbiosis(windows, reference, 9) < 0.01)
    assert np.all(lz_complexity_batch(windows) > 0.95)
