"""Validation telemetry: val/K, val/C, val/S describe the model's predictions; data/C, data/S the data."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bitlm import telemetry as tm
from bitlm.codec import bytes_to_bits
from bitlm.config import ModelConfig, TrainConfig
from bitlm.data import Corpus
from bitlm.engine import evaluate, fit
from bitlm.evaluation import causal_prediction_telemetry, data_telemetry
from bitlm.model import BitTransformerLM
from bitlm.objective import model_inputs

TEXT = b"the quick brown fox jumps over the lazy dog. " * 30 + b"pack my box with five dozen liquor jugs! " * 30
TRAIN = TrainConfig(batch_size=2, context_bytes=16, max_steps=4, warmup_steps=1, log_every=100, eval_every=2,
                    eval_batches=1, lr=1e-2)
KINDS = {
    "flat": ModelConfig.from_name("tiny", max_positions=144),
    "patched": ModelConfig.from_name("tiny", kind="patched", max_positions=16),
    "byte": ModelConfig.from_name("tiny", representation="byte", max_positions=16),
    "diffusion": ModelConfig.from_name("tiny", causal=False, max_positions=144),
}


@pytest.fixture(scope="module")
def corpus():
    return Corpus.from_bytes(TEXT, window_bytes=32, val_fraction=0.2)


def model_of(cfg, corpus, seed):
    torch.manual_seed(seed)
    model = BitTransformerLM(cfg)
    model.set_reference_marginals(corpus.phase_marginals(cfg.parity))
    return model


def first_val_batch(corpus):
    return next(iter(corpus.val.sequential_batches(TRAIN.batch_size, TRAIN.context_bytes, max_batches=1)))


@pytest.mark.parametrize("kind", list(KINDS))
def test_val_telemetry_changes_with_the_weights_on_the_same_data(corpus, kind):
    a = evaluate(model_of(KINDS[kind], corpus, 0), corpus, TRAIN)
    b = evaluate(model_of(KINDS[kind], corpus, 1), corpus, TRAIN)
    for scores in (a, b):
        assert all(0.0 <= scores[key] <= 1.0 for key in ("val/K", "val/C", "val/S")), scores
    assert (a["val/C"], a["val/S"]) != (b["val/C"], b["val/S"])


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_data_reference_does_not_depend_on_the_weights(corpus, kind):
    batch = first_val_batch(corpus)
    a = data_telemetry(model_of(KINDS[kind], corpus, 0), batch)
    b = data_telemetry(model_of(KINDS[kind], corpus, 1), batch)
    assert a == b and set(a) == {"C", "S"}


def test_fit_reports_the_data_reference_at_the_first_and_last_evaluation_and_the_models_at_each(corpus):
    model = model_of(KINDS["flat"], corpus, 0)
    result = fit(model, corpus, dataclasses.replace(TRAIN, max_steps=6))
    first, second, last = result.history
    assert "data/C" not in second and "data/S" not in second
    assert result.data_reference == {"data/C": first["data/C"], "data/S": first["data/S"]}
    assert {k: last[k] for k in ("data/C", "data/S")} == result.data_reference
    expected = data_telemetry(model, first_val_batch(corpus))
    assert result.data_reference == {"data/C": expected["C"], "data/S": expected["S"]}
    assert (first["val/C"], first["val/S"]) != (second["val/C"], second["val/S"])


def perfect_logits(ids, n_classes):
    """Causal logits that put (almost) all mass on the id that actually comes next."""
    nxt = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)  # the last position's prediction is never read
    return F.one_hot(nxt, n_classes).float() * 60.0


@pytest.mark.parametrize("kind", ["flat", "byte"])
def test_a_model_that_predicts_the_data_exactly_reads_the_datas_C_and_S(corpus, kind):
    model = model_of(KINDS[kind], corpus, 0)
    batch = first_val_batch(corpus)
    ids = model_inputs(model, batch)
    tel = causal_prediction_telemetry(model, ids, perfect_logits(ids, model.n_outputs))
    data = data_telemetry(model, batch)
    assert tel["C"] == pytest.approx(data["C"])
    assert tel["S"] == pytest.approx(data["S"], rel=1e-5)
    assert tel["K"] == pytest.approx(1.0, abs=1e-3)


def test_the_byte_baselines_bit_probabilities_are_sums_of_its_byte_distribution(corpus):
    model = model_of(KINDS["byte"], corpus, 0)
    ids = torch.tensor([[65, 66, 67]])
    logits = torch.full((1, 3, 256), -1e4)
    logits[0, :, 0b1000_0001] = 0.0  # half the mass on a byte with bits 0 and 7 set (parity 0)
    logits[0, :, 0b0000_0001] = 0.0  # half on one with bit 7 set (parity 1)
    tel = causal_prediction_telemetry(model, ids, logits)
    p = torch.tensor([[0.5, 0, 0, 0, 0, 0, 0, 1, 0.5] * 2]).double()
    predicted = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 1, 1] * 2])  # argmax takes the first of tied maxima: byte 1
    expected = tm.prediction_summary(p, predicted, model.reference_marginals, 9)
    assert tel["S"] == pytest.approx(float(expected["symbiosis"][0]))
    assert tel["C"] == pytest.approx(float(expected["lz_complexity"][0]))
    assert tel["K"] == pytest.approx(1.0 - 1.0 / 8.0, abs=1e-3)  # one bit of entropy per byte, / 8


def test_prediction_summary_of_exact_predictions_equals_the_bits_own_C_and_S():
    rng = np.random.default_rng(0)
    bits = torch.from_numpy(np.stack([bytes_to_bits(bytes(rng.integers(32, 127, 40, dtype=np.uint8)))
                                      for _ in range(3)])).long()
    reference = np.linspace(0.1, 0.9, 9)
    tel = tm.prediction_summary(bits.double(), bits, reference, 9)
    torch.testing.assert_close(tel["lz_complexity"].double(), torch.from_numpy(tm.lz_complexity_batch(bits)))
    torch.testing.assert_close(tel["symbiosis"].double(), torch.from_numpy(tm.symbiosis(bits, reference, 9)),
                               rtol=1e-5, atol=1e-6)


def test_prediction_summary_reads_only_the_weighted_positions():
    p = torch.tensor([[0.9, 0.1, 0.5, 0.5]])
    predicted = torch.tensor([[1, 0, 1, 1]])
    weight = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    tel = tm.prediction_summary(p, predicted, [0.5, 0.5], 2, weight=weight)
    h = -(0.9 * math.log2(0.9) + 0.1 * math.log2(0.1))
    assert float(tel["negentropy"][0]) == pytest.approx(1 - h, rel=1e-5)
    q = torch.tensor([(0.9 + 1) / 3, (0.1 + 1) / 3]).double()
    expected = math.exp(-float(tm.bernoulli_kl(q, torch.tensor([0.5, 0.5]).double()).sum()))
    assert float(tel["symbiosis"][0]) == pytest.approx(expected, rel=1e-5)


def test_diffusion_telemetry_is_reproducible_for_the_same_weights(corpus):
    model = model_of(KINDS["diffusion"], corpus, 0)
    cfg = dataclasses.replace(TRAIN, seed=3)
    assert evaluate(model, corpus, cfg) == evaluate(model, corpus, cfg)


@pytest.mark.parametrize("kind", ["flat", "patched", "byte"])
def test_evaluate_text_is_evaluate_bpb_on_a_text_that_fits_one_window(kind):
    from bitlm.evaluation import evaluate_text
    from bitlm.objective import evaluate_bpb

    torch.manual_seed(0)
    model = BitTransformerLM(ModelConfig.from_name("tiny", kind=kind)).eval()
    data = TEXT[:40]  # 40 bytes: well inside the tiny preset's 128-byte context
    window = torch.tensor([list(data)], dtype=torch.uint8)
    expected = evaluate_bpb(model, [window])
    got = evaluate_text(model, data)
    assert got["n_bytes"] == expected["n_bytes"] == len(data) - 1
    assert got["bpb"] == pytest.approx(expected["bpb"], rel=1e-5)
