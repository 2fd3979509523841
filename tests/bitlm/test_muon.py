"""train.optimizer='muon' (Muon for the blocks' matrices, AdamW for the rest) and the wsd schedule."""

import copy
import dataclasses
import re

import pytest
import torch
import torch.distributed as dist

from bitlm.config import ExperimentConfig, ModelConfig, ParallelConfig, TrainConfig
from bitlm.data import Corpus
from bitlm.engine import fit, lr_factor
from bitlm.model import BitTransformerLM
from bitlm.optim import MuonAdamW, build_optimizer, muon_parameters, set_lr
from bitlm.parallel import DDPStrategy, FSDPStrategy
from bitlm.pipelining import prune_to_stage
from bitlm.state import load_named_optimizer_state, named_optimizer_state

TEXT = (b"the quick brown fox jumps over the lazy dog. " * 40 + b"pack my box with five dozen liquor jugs! " * 40)
KINDS = ("flat", "patched", "byte")
MUON = TrainConfig(batch_size=4, context_bytes=16, max_steps=12, warmup_steps=2, log_every_steps=1,
                   eval_every_steps=6, n_eval_batches=2, lr=3e-3, optimizer="muon", muon_lr=0.02)
BLOCK_MATRIX = re.compile(r"body\.stack\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.[02])\.weight")


@pytest.fixture(scope="module")
def corpus():
    return Corpus.from_bytes(TEXT, window_bytes=64, val_fraction=0.2)


def tiny(kind: str, **changes) -> BitTransformerLM:
    torch.manual_seed(0)
    return BitTransformerLM(ModelConfig.from_name("tiny", kind=kind, **changes))


def names_of(model, params) -> set[str]:
    held = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in held}


def losses(events):
    return [m["train/loss"] for m, _ in events if "train/loss" in m]


def run(corpus, cfg=MUON, kind="flat", report=None, **kwargs):
    events = []
    result = fit(tiny(kind), corpus, cfg, report=report or (lambda m, c: events.append((dict(m), c))), **kwargs)
    return result, events


@pytest.mark.parametrize("kind", KINDS)
def test_muon_takes_the_blocks_matrices_and_adamw_everything_else(kind):
    model = tiny(kind, act=True)  # the ACT halting unit is a matrix of the stack outside the blocks
    optimizer = build_optimizer(model, MUON)
    assert isinstance(optimizer, MuonAdamW)
    to_muon = names_of(model, [p for g in optimizer.muon.param_groups for p in g["params"]])
    to_adamw = names_of(model, [p for g in optimizer.adamw.param_groups for p in g["params"]])
    assert to_muon and all(BLOCK_MATRIX.fullmatch(n) for n in to_muon)
    assert to_muon == {n for n, _ in model.named_parameters() if BLOCK_MATRIX.fullmatch(n)}
    assert to_muon.isdisjoint(to_adamw) and to_muon | to_adamw == {n for n, _ in model.named_parameters()}
    assert "body.stack.halt.weight" in to_adamw


def test_adamw_stays_the_default_optimizer():
    optimizer = build_optimizer(tiny("flat"), TrainConfig())
    assert type(optimizer) is torch.optim.AdamW and len(optimizer.param_groups) == 2


def test_set_lr_scales_both_optimizers_by_the_same_factor():
    optimizer = build_optimizer(tiny("patched"), MUON)
    set_lr(optimizer, MUON.lr * 0.25)
    assert [g["lr"] for g in optimizer.adamw.param_groups] == [MUON.lr * 0.25] * 2
    assert [g["lr"] for g in optimizer.muon.param_groups] == [pytest.approx(MUON.muon_lr * 0.25)]


def test_state_dict_round_trip_continues_the_same_steps():
    def step(model, optimizer, seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 2, (2, 36), generator=g)
        loss = model(ids)[0].float().logsumexp(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    model = tiny("flat")
    optimizer = build_optimizer(model, MUON)
    step(model, optimizer, 1)
    twin = tiny("flat")
    twin.load_state_dict(model.state_dict())
    copy_optimizer = build_optimizer(twin, MUON)
    # a deep copy: torch's load_state_dict keeps same-device state tensors, which the two runs would share
    copy_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert set(copy_optimizer.muon.state[copy_optimizer.muon.param_groups[0]["params"][0]]) == {"momentum_buffer"}
    for seed in (2, 3):
        step(model, optimizer, seed)
        step(twin, copy_optimizer, seed)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_an_adamw_state_does_not_load_into_muon():
    model = tiny("flat")
    adamw_state = build_optimizer(model, TrainConfig()).state_dict()
    with pytest.raises(ValueError, match="train.optimizer"):
        build_optimizer(model, MUON).load_state_dict(adamw_state)


@pytest.mark.parametrize("kind", ["flat", "patched"])
def test_a_pipeline_stage_gives_muon_only_its_own_blocks_and_its_named_state_round_trips(kind):
    model = tiny(kind, n_layers=2)
    prune_to_stage(model, range(1, 2), is_first=False, is_last=True)
    optimizer = build_optimizer(model, MUON)
    assert names_of(model, muon_parameters(model)) and all(
        n.startswith("body.stack.blocks.1.") for n in names_of(model, muon_parameters(model)))
    ids = torch.randint(0, 2, (2, 3, model.config.d_model)).float()  # hidden states of the stage before
    model(ids, causal=True, readout=False)[0].float().square().mean().backward()
    optimizer.step()
    named = named_optimizer_state(model, optimizer)
    fresh = build_optimizer(model, MUON)
    load_named_optimizer_state(model, fresh, named)
    assert named_optimizer_state(model, fresh)["state"].keys() == named["state"].keys()


@pytest.mark.parametrize("kind", ["flat", "patched"])
def test_fit_with_muon_lowers_the_loss(corpus, kind):
    result, events = run(corpus, dataclasses.replace(MUON, max_steps=30, eval_every_steps=30), kind=kind)
    curve = losses(events)
    assert len(curve) == 30 and sum(curve[-5:]) / 5 < sum(curve[:5]) / 5
    assert 0 < result.metrics["val/bpb"] < 9


def test_a_resumed_muon_run_continues_identically(corpus, tmp_path):
    cfg = dataclasses.replace(MUON, checkpoint_every_steps=5, n_checkpoints_kept=5, schedule="wsd")
    _, straight = run(corpus, cfg)

    class Crash(Exception):
        pass

    first = []

    def crash_at_the_first_checkpoint(metrics, checkpoint):
        first.append((dict(metrics), checkpoint))
        if checkpoint is not None:
            raise Crash

    with pytest.raises(Crash):
        run(corpus, cfg, report=crash_at_the_first_checkpoint, checkpoint_dir=tmp_path)
    assert (tmp_path / "step-00000005").is_dir()
    torch.manual_seed(999)  # a fresh process builds another init; the resumed weights win
    second = []
    resumed = fit(BitTransformerLM(ModelConfig.from_name("tiny", kind="flat")), corpus, cfg,
                  report=lambda m, c: second.append((dict(m), c)), checkpoint_dir=tmp_path)
    assert resumed.step == cfg.max_steps
    torch.testing.assert_close(losses(first) + losses(second), losses(straight), rtol=1e-6, atol=1e-7)


def test_muon_under_ddp_trains_as_a_single_process(corpus, tmp_path):
    _, single_events = run(corpus, dataclasses.replace(MUON, max_steps=4, eval_every_steps=4))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        _, ddp_events = run(corpus, dataclasses.replace(MUON, max_steps=4, eval_every_steps=4),
                              strategy=DDPStrategy(rank=0, world_size=1))
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(losses(ddp_events), losses(single_events), rtol=1e-6, atol=1e-7)


def test_muon_with_fsdp_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"^train.optimizer: 'muon' is not supported with parallel.strategy='fsdp'"):
        ExperimentConfig(train=MUON, parallel=ParallelConfig(strategy="fsdp"))
    with pytest.raises(ValueError, match=r"^train.optimizer: 'muon' is not supported by the fsdp strategy"):
        FSDPStrategy(rank=0, world_size=2).check(tiny("flat"), MUON)
    FSDPStrategy(rank=0, world_size=2).check(tiny("flat"), TrainConfig())  # AdamW shards as before


WSD = TrainConfig(max_steps=1000, warmup_steps=100, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.1)


@pytest.mark.parametrize("step, factor", [(0, 0.01), (49, 0.5), (99, 1.0), (100, 1.0), (500, 1.0), (800, 1.0),
                                          (900, 0.55), (950, 0.325), (1000, 0.1)])
def test_wsd_warms_up_holds_then_decays_linearly_to_min_lr_ratio(step, factor):
    assert lr_factor(WSD, step, 0.0) == pytest.approx(factor, abs=1e-9)


def test_wsd_follows_elapsed_seconds_with_a_time_budget():
    cfg = dataclasses.replace(WSD, max_steps=10_000_000, max_seconds=100.0, warmup_steps=0)
    assert lr_factor(cfg, 10, 70.0) == pytest.approx(1.0)
    assert lr_factor(cfg, 10, 90.0) == pytest.approx(0.55)
    assert lr_factor(cfg, 10, 100.0) == pytest.approx(0.1)


def test_wsd_with_decay_over_the_whole_run_is_a_linear_decay():
    cfg = dataclasses.replace(WSD, warmup_steps=0, decay_fraction=1.0)
    assert [lr_factor(cfg, s, 0.0) for s in (0, 500, 1000)] == pytest.approx([1.0, 0.55, 0.1])


@pytest.mark.parametrize("changes, field", [
    ({"decay_fraction": 0.0}, "train.decay_fraction"),
    ({"decay_fraction": 1.5}, "train.decay_fraction"),
    ({"muon_lr": 0.0}, "train.muon_lr"),
    ({"muon_momentum": 1.0}, "train.muon_momentum"),
    ({"muon_momentum": -0.1}, "train.muon_momentum"),
    ({"optimizer": "sgd"}, "train.optimizer"),
    ({"schedule": "linear"}, "train.schedule"),
])
def test_invalid_optimizer_and_schedule_options_name_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"^{re.escape(field)}: "):
        TrainConfig(**changes)
