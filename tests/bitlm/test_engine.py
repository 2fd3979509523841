"""engine.fit: learning, reporting, schedules, checkpoints and exact resume."""

import dataclasses
import math

import pytest
import torch

from bitlm import checkpoint as ckpt
from bitlm.config import ModelConfig, TrainConfig
from bitlm.data import Corpus
from bitlm.engine import fit, lr_factor
from bitlm.model import BitTransformerLM

TEXT = (b"the quick brown fox jumps over the lazy dog. " * 40 + b"pack my box with five dozen liquor jugs! " * 40)
MODEL = ModelConfig.from_name("tiny", max_positions=288)
TRAIN = TrainConfig(batch_size=4, context_bytes=16, max_steps=12, warmup_steps=2, log_every=1, eval_every=6,
                    eval_batches=2, lr=3e-3)


@pytest.fixture(scope="module")
def corpus():
    return Corpus.from_bytes(TEXT, window_bytes=64, val_fraction=0.2)


def run(corpus, cfg=TRAIN, model_cfg=MODEL, **kwargs):
    torch.manual_seed(0)
    model = BitTransformerLM(model_cfg)
    events = []
    result = fit(model, corpus, cfg, report=lambda m, c: events.append((dict(m), c)), **kwargs)
    return model, result, events


def losses(events):
    return [m["train/loss"] for m, _ in events if "train/loss" in m]


def test_fit_lowers_the_loss_and_reports_val_bpb_and_telemetry(corpus):
    _, result, events = run(corpus, dataclasses.replace(TRAIN, max_steps=30, eval_every=30))
    curve = losses(events)
    assert len(curve) == 30
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5
    for key in ("val/bpb", "val/K", "val/C", "val/S"):
        assert math.isfinite(result.metrics[key])
    assert result.step == 30 and len(result.history) == 1


def test_byte_baseline_trains_through_the_same_engine(corpus):
    byte_cfg = dataclasses.replace(MODEL, representation="byte", max_positions=32)
    _, result, events = run(corpus, model_cfg=byte_cfg)
    assert result.step == TRAIN.max_steps
    assert 0 < result.metrics["val/bpb"] < 9


def test_reported_throughput_and_bytes_seen_follow_the_batch_shape(corpus):
    cfg = dataclasses.replace(TRAIN, grad_accum_steps=2)
    _, _, events = run(corpus, cfg)
    logs = [m for m, _ in events if "bytes_per_s" in m]
    assert logs[-1]["bytes_seen"] == 12 * 2 * 4 * 16
    assert all(m["bytes_per_s"] > 0 and m["bits_per_s"] == pytest.approx(9 * m["bytes_per_s"]) for m in logs)


def test_resume_gives_the_same_loss_curve_as_an_uninterrupted_run(corpus, tmp_path):
    cfg = dataclasses.replace(TRAIN, checkpoint_every=5, keep_checkpoints=5)
    dropout_model = dataclasses.replace(MODEL, dropout=0.1)  # dropout makes the RNG state part of resume
    _, straight, events = run(corpus, cfg, model_cfg=dropout_model)

    first = []

    class Crash(Exception):
        pass

    def crash_after_first_checkpoint(metrics, checkpoint):
        first.append((dict(metrics), checkpoint))
        if checkpoint is not None:
            raise Crash

    torch.manual_seed(0)
    with pytest.raises(Crash):
        fit(BitTransformerLM(dropout_model), corpus, cfg, report=crash_after_first_checkpoint, checkpoint_dir=tmp_path)
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000005"
    # a fresh process would rebuild the model from scratch: different init, resumed weights win
    torch.manual_seed(999)
    model = BitTransformerLM(dropout_model)
    second = []
    resumed = fit(model, corpus, cfg, report=lambda m, c: second.append((dict(m), c)), checkpoint_dir=tmp_path)
    assert resumed.step == cfg.max_steps
    torch.testing.assert_close(losses(first) + losses(second), losses(events), rtol=1e-6, atol=1e-7)
    assert resumed.metrics["val/bpb"] == pytest.approx(straight.metrics["val/bpb"], rel=1e-6)


def test_checkpoints_are_reported_and_pruned(corpus, tmp_path):
    cfg = dataclasses.replace(TRAIN, checkpoint_every=3, keep_checkpoints=2)
    _, result, events = run(corpus, cfg, checkpoint_dir=tmp_path)
    reported = [c for _, c in events if c is not None]
    assert [p.name for p in reported] == ["step-00000003", "step-00000006", "step-00000009", "step-00000012"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000009", "step-00000012"]
    assert result.checkpoint == tmp_path / "step-00000012"


def test_time_budget_stops_training(corpus):
    cfg = dataclasses.replace(TRAIN, max_steps=100_000, max_seconds=1.0, eval_every=100_000)
    _, result, _ = run(corpus, cfg)
    assert result.step < 100_000
    assert result.train_seconds >= 1.0


def test_context_longer_than_the_model_is_rejected(corpus):
    cfg = dataclasses.replace(TRAIN, context_bytes=64)  # 576 bits > 288
    with pytest.raises(ValueError, match="max_positions"):
        run(corpus, cfg)


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "constant", "wsd"])
def test_lr_schedules_warm_up_and_stay_positive(schedule):
    cfg = TrainConfig(max_steps=1000, warmup_steps=100, schedule=schedule, min_lr_ratio=0.1)
    factors = [lr_factor(cfg, s, 0.0) for s in range(1000)]
    assert all(0 < f <= 1.0 + 1e-9 for f in factors)
    assert factors[0] < factors[50] < max(factors)
    if schedule == "cosine":
        assert factors[-1] == pytest.approx(0.1, abs=1e-3)
    if schedule == "constant":
        assert factors[-1] == 1.0


def test_time_based_schedule_follows_elapsed_seconds():
    cfg = TrainConfig(max_steps=10_000_000, max_seconds=100.0, warmup_steps=0)
    assert lr_factor(cfg, 10, 50.0) == pytest.approx(0.55, abs=1e-6)
    assert lr_factor(cfg, 10, 100.0) == pytest.approx(0.1, abs=1e-6)


def test_bf16_autocast_trains_on_cpu(corpus):
    _, result, _ = run(corpus, dataclasses.replace(TRAIN, precision="bf16"))
    assert math.isfinite(result.metrics["val/bpb"])


@pytest.mark.slow
def test_compiled_training_matches_eager_training(corpus):
    # torch.compile on CPU generates C++ kernels: ~45 s here, the slowest test of the suite
    cfg = dataclasses.replace(TRAIN, max_steps=4, eval_every=4)
    _, eager, eager_events = run(corpus, cfg)
    _, compiled, compiled_events = run(corpus, dataclasses.replace(cfg, compile=True))
    torch.testing.assert_close(losses(compiled_events), losses(eager_events), rtol=1e-4, atol=1e-5)
    assert compiled.metrics["val/bpb"] == pytest.approx(eager.metrics["val/bpb"], rel=1e-4)


def test_the_progress_bar_shows_the_log_windows_mean_loss_and_bpb(corpus, capsys):
    _, _, events = run(corpus, dataclasses.replace(TRAIN, max_steps=4, log_every=2, eval_every=4), progress=True)
    last = [m for m, _ in events if "train/loss" in m][-1]  # the mean over steps 3 and 4, not step 4's loss
    shown = capsys.readouterr().err
    assert f"loss={last['train/loss']:.4f}" in shown and f"bpb={last['train/bpb']:.3f}" in shown
