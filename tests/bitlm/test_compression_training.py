"""Compression-aware multi-task training: ramped compression probability, stream marker, reporting."""

import math

import numpy as np
import pytest
import torch

from bitlm.codec import bytes_to_bits
from bitlm.compression import compress_bits
from bitlm.config import ModelConfig, TrainConfig
from bitlm.data import Corpus
from bitlm.engine import compress_probability, fit
from bitlm.model import BitTransformerLM
from bitlm.objective import compressed_rows

TEXT = b"aaaaaaaabbbbbbbb the quick brown fox jumps over the lazy dog. " * 60


def test_compression_probability_waits_for_the_warm_up_then_ramps_linearly():
    cfg = TrainConfig(compress_prob=0.4, compress_warmup_steps=10, compress_ramp_steps=4)
    assert [compress_probability(cfg, s) for s in (0, 9)] == [0.0, 0.0]
    assert [compress_probability(cfg, s) for s in (10, 11, 13, 50)] == pytest.approx([0.1, 0.2, 0.4, 0.4])
    assert compress_probability(TrainConfig(), 100) == 0.0


def test_compressed_rows_hold_each_rows_stream_cut_or_padded_with_a_target_mask():
    batch = torch.as_tensor(np.frombuffer(TEXT[:96], dtype=np.uint8).copy()).view(3, 32)
    ids, mask, ratio = compressed_rows(batch, parity=True)
    assert ids.shape == (3, 288) and mask.shape == (3, 287)
    for row, got, row_mask in zip(batch, ids, mask):
        stream = compress_bits(bytes_to_bits(row.numpy().tobytes()))
        n = min(len(stream), 288)
        assert got[:n].tolist() == stream[:n].tolist()
        assert int(row_mask.sum()) == n - 1
    assert ratio > 0


def test_the_stream_marker_changes_predictions_and_needs_two_streams():
    torch.manual_seed(0)
    model = BitTransformerLM(ModelConfig.from_name("tiny", kind="patched", n_streams=2))
    torch.nn.init.normal_(model.stream_embed.weight, std=1.0)
    x = torch.randint(0, 2, (2, 27))
    text, _ = model(x)
    compressed, _ = model(x, stream=torch.ones(2, dtype=torch.long))
    assert not torch.allclose(text, compressed)
    with pytest.raises(ValueError, match="n_streams"):
        BitTransformerLM(ModelConfig.from_name("tiny"))(x, stream=torch.ones(2, dtype=torch.long))


@pytest.mark.parametrize("kind", ["patched", "flat"])
def test_fit_mixes_compressed_rows_and_reports_the_ratio(kind):
    corpus = Corpus.from_bytes(TEXT, window_bytes=64, val_fraction=0.2)
    torch.manual_seed(0)
    model = BitTransformerLM(ModelConfig.from_name("tiny", kind=kind, n_streams=2))
    cfg = TrainConfig(batch_size=8, context_bytes=16, max_steps=6, log_every=3, eval_every=6, eval_batches=1,
                      compress_prob=0.5, compress_warmup_steps=2, compress_ramp_steps=2)
    logs = []
    result = fit(model, corpus, cfg, report=lambda m, c: logs.append(m))
    last = [m for m in logs if "train/loss" in m][-1]
    assert 0 < last["train/compressed_fraction"] <= 1
    assert last["train/compression_ratio"] > 0
    assert math.isfinite(result.metrics["val/bpb"])


def test_compression_needs_a_two_stream_causal_model():
    corpus = Corpus.from_bytes(TEXT, window_bytes=64, val_fraction=0.2)
    with pytest.raises(ValueError, match="compress_prob"):
        fit(BitTransformerLM(ModelConfig.from_name("tiny")), corpus,
            TrainConfig(batch_size=2, context_bytes=16, max_steps=1, compress_prob=0.5))
