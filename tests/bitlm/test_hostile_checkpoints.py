"""Damaged checkpoints, interrupted saves and diverging runs: resume falls back, nothing non-finite is saved."""

import dataclasses
import json
import math
import pickle

import pytest
import torch
from safetensors.torch import load_file

from bitlm import checkpoint as ckpt
from bitlm.config import ModelConfig, TrainConfig
from bitlm.data import Corpus
from bitlm.engine import NonFiniteLossError, fit
from bitlm.model import BitTransformerLM
from bitlm.parallel import Strategy

TEXT = b"the quick brown fox jumps over the lazy dog. " * 30 + b"pack my box with five dozen liquor jugs! " * 30
MODEL = ModelConfig.from_name("tiny", max_positions=144)
TRAIN = TrainConfig(batch_size=2, context_bytes=16, max_steps=2, warmup_steps=1, log_every=1, eval_every=100,
                    eval_batches=1, checkpoint_every=1, keep_checkpoints=5)


@pytest.fixture(scope="module")
def corpus():
    return Corpus.from_bytes(TEXT, window_bytes=32, val_fraction=0.2)


def train(corpus, root, max_steps=2, report=None, **kwargs):
    cfg = dataclasses.replace(TRAIN, max_steps=max_steps)
    events = []

    def record(metrics, path):
        events.append((dict(metrics), path))
        if report is not None:
            report(metrics, path)

    result = fit(BitTransformerLM(MODEL), corpus, cfg, checkpoint_dir=root, report=record, **kwargs)
    return result, events


def first_trained_step(events):
    return min(int(m["step"]) for m, _ in events if "train/loss" in m)


def truncate_weights(path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def pickle_as_weights(path):
    (path / "model.safetensors").write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))


def break_trainer_state(path):
    (path / "trainer_state.json").write_text('{"step": 2, "train_seconds"')


def forget_history(path):
    (path / "trainer_state.json").write_text(json.dumps({"step": 2, "train_seconds": 1.0}))


def empty_config(path):
    (path / "config.json").write_text("")


def drop_optimizer(path):
    (path / "optimizer.safetensors").unlink()


def drop_optimizer_json(path):
    (path / "optimizer.json").unlink()


def truncate_optimizer(path):
    data = (path / "optimizer.safetensors").read_bytes()
    (path / "optimizer.safetensors").write_bytes(data[:-10])


DAMAGE = {
    "truncated model.safetensors": (truncate_weights, "model.safetensors: truncated"),
    "a pickle as model.safetensors": (pickle_as_weights, "model.safetensors: a pickle"),
    "bad trainer_state.json": (break_trainer_state, "trainer_state.json is not valid JSON"),
    "trainer_state.json without a history": (forget_history, "trainer_state.json: 'history' is missing"),
    "empty config.json": (empty_config, "config.json is not valid JSON"),
    "missing optimizer.safetensors": (drop_optimizer, "optimizer.safetensors is missing"),
    "missing optimizer.json": (drop_optimizer_json, "optimizer.json is missing"),
    "truncated optimizer.safetensors": (truncate_optimizer, r"optimizer.safetensors is truncated \(\d+ of \d+ bytes\)"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_resume_skips_a_damaged_newest_checkpoint_naming_it(corpus, tmp_path, kind):
    damage, reason = DAMAGE[kind]
    train(corpus, tmp_path)
    damage(tmp_path / "step-00000002")
    with pytest.warns(ckpt.CheckpointWarning, match=rf"step-00000002: {reason}.*resuming from step-00000001"):
        result, events = train(corpus, tmp_path, max_steps=3)
    assert first_trained_step(events) == 2  # continued after step 1, the newest loadable one
    assert result.step == 3


def test_resume_with_every_checkpoint_damaged_is_one_clear_error(corpus, tmp_path):
    train(corpus, tmp_path)
    truncate_weights(tmp_path / "step-00000002")
    empty_config(tmp_path / "step-00000001")
    with pytest.raises(ckpt.CheckpointError) as err:
        train(corpus, tmp_path, max_steps=3)
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path) in message and "step-00000002: model.safetensors: truncated" in message
    assert "step-00000001: config.json is not valid JSON" in message


def test_an_explicit_damaged_resume_point_is_one_clear_error(corpus, tmp_path):
    train(corpus, tmp_path / "a")
    bad = tmp_path / "a" / "step-00000002"
    break_trainer_state(bad)
    with pytest.raises(ckpt.CheckpointError, match="cannot resume from .*step-00000002: trainer_state.json is not"):
        train(corpus, tmp_path / "b", resume_from=bad)


def test_temp_directories_of_an_interrupted_save_are_removed(corpus, tmp_path):
    train(corpus, tmp_path)
    stale = [tmp_path / ".step-00000002.k3j9x_q1", tmp_path / ".step-00000001.old"]
    for path in stale:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"partial")
    unrelated = tmp_path / ".keep-me"
    unrelated.mkdir()
    train(corpus, tmp_path, max_steps=3)
    assert not any(path.exists() for path in stale)
    assert unrelated.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".keep-me"]


def test_a_kill_between_the_renames_of_a_save_loses_no_checkpoint(corpus, tmp_path):
    train(corpus, tmp_path)
    # atomic_directory had moved step-2 aside to .step-2.old and not yet renamed its new copy in
    (tmp_path / "step-00000002").rename(tmp_path / ".step-00000002.old")
    (tmp_path / ".step-00000002.a1b2c3d4").mkdir()
    _, events = train(corpus, tmp_path, max_steps=3)
    assert first_trained_step(events) == 3
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000001", "step-00000002", "step-00000003"]


def finite(path):
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path / "model.safetensors")).values()
               if t.is_floating_point())


def poison(model):
    with torch.no_grad():
        next(model.parameters()).fill_(math.inf)


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    model = BitTransformerLM(MODEL)

    def poison_after_step_2(metrics, path):
        if path is not None and path.name == "step-00000002":
            poison(model)

    cfg = dataclasses.replace(TRAIN, max_steps=4)
    with pytest.raises(NonFiniteLossError, match="training step 3: the training loss is nan") as err:
        fit(model, corpus, cfg, checkpoint_dir=tmp_path, report=poison_after_step_2)
    assert err.value.step == 3 and err.value.checkpoint == tmp_path / "step-00000002"
    assert "step-00000002" in str(err.value) and "\n" not in str(err.value)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000001", "step-00000002"]
    assert all(finite(p) for p in ckpt.list_checkpoints(tmp_path))


def test_weights_made_non_finite_by_a_step_are_never_checkpointed(corpus, tmp_path):
    model = BitTransformerLM(MODEL)

    def poison_at_the_log_of_step_2(metrics, path):  # the log event comes before that step's save
        if metrics.get("step") == 2 and "train/loss" in metrics:
            poison(model)

    with pytest.raises(NonFiniteLossError, match=r"training step 2: weight \S+ is not finite") as err:
        fit(model, corpus, dataclasses.replace(TRAIN, max_steps=3), checkpoint_dir=tmp_path,
            report=poison_at_the_log_of_step_2)
    assert err.value.checkpoint == tmp_path / "step-00000001"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000001"]
    assert finite(tmp_path / "step-00000001")


class NanGradientsAtStep2(Strategy):
    calls = 0

    def clip_grad_norm(self, model, max_norm):
        self.calls += 1
        norm = super().clip_grad_norm(model, max_norm)
        return math.nan if self.calls == 2 else norm


def test_a_non_finite_gradient_norm_stops_before_the_optimizer_step(corpus, tmp_path):
    model = BitTransformerLM(MODEL)
    with pytest.raises(NonFiniteLossError, match="training step 2: the gradient norm is nan"):
        fit(model, corpus, TRAIN, checkpoint_dir=tmp_path, strategy=NanGradientsAtStep2())
    saved = load_file(str(tmp_path / "step-00000001" / "model.safetensors"))
    for name, value in model.state_dict().items():  # the failed step changed no weight
        assert torch.equal(value, saved[name]), name


def test_a_resumed_run_after_a_failure_continues_from_the_good_checkpoint(corpus, tmp_path):
    model = BitTransformerLM(MODEL)
    with pytest.raises(NonFiniteLossError):
        fit(model, corpus, TRAIN, checkpoint_dir=tmp_path, strategy=NanGradientsAtStep2())
    result, events = train(corpus, tmp_path)
    assert first_trained_step(events) == 2 and result.step == 2
    assert json.loads((tmp_path / "step-00000002" / "trainer_state.json").read_text())["step"] == 2


def test_loading_a_damaged_checkpoint_names_it_and_the_file(corpus, tmp_path):
    train(corpus, tmp_path)
    drop_optimizer_json(tmp_path / "step-00000002")
    model = BitTransformerLM(MODEL)
    with pytest.raises(ckpt.CheckpointError, match=r"step-00000002: optimizer.json is missing$"):
        ckpt.load_checkpoint(tmp_path / "step-00000002", model, torch.optim.AdamW(model.parameters()))
