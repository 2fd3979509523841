"""Progressive scaling inside engine.fit: growth on plateaus, preserved logits, checkpoints and resume."""

import dataclasses

import pytest
import torch

from bitlm import checkpoint as ckpt
from bitlm.config import ExperimentConfig, ModelConfig, ScalingConfig, TrainConfig
from bitlm.data import Corpus
from bitlm.engine import fit
from bitlm.model import BitTransformerLM

TEXT = (b"the quick brown fox jumps over the lazy dog. " * 40 + b"pack my box with five dozen liquor jugs! " * 40)
MODEL = ModelConfig.from_name("tiny", kind="patched", max_positions=64)
TRAIN = TrainConfig(batch_size=4, context_bytes=16, max_steps=28, warmup_steps=2, log_every=4, eval_every=4,
                    eval_batches=2, lr=3e-3)
# improve_thresh above any possible relative improvement: every second evaluation is a plateau
ALWAYS = ScalingConfig(enabled=True, window=1, improve_thresh=10.0, rewarm_steps=4)


@pytest.fixture(scope="module")
def corpus():
    return Corpus.from_bytes(TEXT, window_bytes=64, val_fraction=0.2)


def run(corpus, scaling=ALWAYS, cfg=TRAIN, **kwargs):
    torch.manual_seed(0)
    events = []
    result = fit(BitTransformerLM(MODEL), corpus, ExperimentConfig(model=MODEL, train=cfg, scaling=scaling),
                 report=lambda m, c: events.append((dict(m), c)), **kwargs)
    return result, events


def test_plateaus_grow_the_model_through_the_cycle_without_changing_its_logits(corpus):
    result, events = run(corpus)
    kinds = [e["kind"] for e in result.expansions]
    assert kinds[:3] == ["depth", "width", "context"]
    assert all(e["logit_change"] < 1e-4 for e in result.expansions)
    grown = result.model.config
    assert grown.n_layers == MODEL.n_layers + 1 and grown.d_ff == 2 * MODEL.d_ff
    assert grown.max_positions == 2 * MODEL.max_positions
    reported = [m for m, _ in events if m.get("event") == "expand"]
    assert [m["scaling/kind"] for m in reported] == kinds
    assert reported[-1]["scaling/expansions"] == len(kinds)
    assert result.metrics["val/bpb"] < 9


def test_a_context_expansion_doubles_the_training_crops(corpus):
    result, events = run(corpus, dataclasses.replace(ALWAYS, order="context"), dataclasses.replace(TRAIN, max_steps=12))
    assert [e["kind"] for e in result.expansions] == ["context"]
    logs = [m for m, _ in events if "bytes_per_s" in m]
    # the log at step 8 follows the expansion at step 8's evaluation; crops are 32 bytes from step 9 on
    assert logs[-1]["bytes_seen"] == 4 * 16 * 8 + 4 * 32 * 4


def test_growth_stops_at_max_expansions_and_max_parameters(corpus):
    result, _ = run(corpus, dataclasses.replace(ALWAYS, max_expansions=1))
    assert len(result.expansions) == 1
    base = BitTransformerLM(MODEL).num_parameters()
    result, _ = run(corpus, dataclasses.replace(ALWAYS, order="depth", max_parameters=base + 1))
    assert result.expansions == []


def test_the_learning_rate_drops_by_sqrt2_and_rewarms_after_an_expansion(corpus):
    cfg = dataclasses.replace(TRAIN, schedule="constant", max_steps=12)
    result, events = run(corpus, dataclasses.replace(ALWAYS, order="width", max_expansions=1), cfg)
    step = result.expansions[0]["step"]
    lrs = {int(m["step"]): m["lr"] for m, _ in events if "lr" in m}
    assert lrs[step] == pytest.approx(TRAIN.lr)
    assert lrs[step + 4] == pytest.approx(TRAIN.lr / 2 ** 0.5)  # steps step..step+3 rewarm, logged at +4
    assert lrs[step + 4] > lrs.get(step + 1, 0)


class Interrupt(Exception):
    pass


def test_every_expansion_is_a_checkpoint_and_resume_continues_with_the_grown_model(corpus, tmp_path):
    straight, _ = run(corpus, checkpoint_dir=tmp_path / "a")
    saved = []

    def stop_after_the_second_expansion(metrics, checkpoint):
        if checkpoint is not None:
            saved.append(int(checkpoint.name.split("-")[1]))
        if metrics.get("step", 0) >= 18:
            raise Interrupt

    torch.manual_seed(0)
    with pytest.raises(Interrupt):
        fit(BitTransformerLM(MODEL), corpus, ExperimentConfig(model=MODEL, train=TRAIN, scaling=ALWAYS),
            report=stop_after_the_second_expansion,
            checkpoint_dir=tmp_path / "b")
    assert saved == [8, 16]  # one checkpoint per expansion (no periodic ones in this config)
    resumed, _ = run(corpus, checkpoint_dir=tmp_path / "b")
    assert resumed.model.config == straight.model.config
    assert [e["kind"] for e in resumed.expansions] == [e["kind"] for e in straight.expansions]
    assert resumed.metrics["val/bpb"] == pytest.approx(straight.metrics["val/bpb"], abs=1e-4)
    assert ckpt.read_config(resumed.checkpoint) == resumed.model.config


def test_resuming_a_checkpoint_of_an_unrelated_model_is_refused(corpus, tmp_path):
    run(corpus, dataclasses.replace(ALWAYS, enabled=False), dataclasses.replace(TRAIN, max_steps=4),
        checkpoint_dir=tmp_path)
    other = dataclasses.replace(MODEL, d_model=32, n_heads=2)
    with pytest.raises(ValueError, match="different model"):
        fit(BitTransformerLM(other), corpus, TRAIN, checkpoint_dir=tmp_path)
