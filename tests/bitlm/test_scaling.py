"""Progressive scaling: function-preserving expansions, the plateau detector and the growth schedule."""

import dataclasses
import json

import pytest
import torch

from bitlm.config import ModelConfig, ScalingConfig
from bitlm.model import BYTE_MASK, MASK, BitTransformerLM
from bitlm.objective import batch_loss as causal_loss
from bitlm.parallel import apply_activation_checkpointing
from bitlm.scaling import (PlateauDetector, can_expand, count_parameters, expand_model, expanded_config,
                           expanded_lr_scale, next_expansion)

CONTEXT_BYTES = 3
SHAPE = {"d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32, "local_d_ff": 16}
VARIANTS = {
    "flat": ("flat", {}),
    "flat-noncausal": ("flat", {"causal": False}),
    "patched": ("patched", {}),
    "patched-noncausal": ("patched", {"causal": False}),
    "byte": ("byte", {}),
    "byte-noncausal": ("byte", {"causal": False}),
    "reversible": ("flat", {"reversible": True}),
    "patched-reversible": ("patched", {"reversible": True}),
    "checkpointed": ("flat", {"checkpoint_activations": True}),
    "streams": ("flat", {"n_streams": 2}),
}
KINDS = ("depth", "width", "context")


def make(variant="flat", seed=0, **overrides):
    kind, options = VARIANTS[variant]
    options = dict(options)
    checkpointed = options.pop("checkpoint_activations", False)  # applied from outside the model
    cfg = ModelConfig.from_name("tiny", kind, **SHAPE)
    cfg = dataclasses.replace(cfg, max_positions=CONTEXT_BYTES * cfg.positions_per_byte, **(options | overrides))
    torch.manual_seed(seed)
    model = BitTransformerLM(cfg).eval()
    return apply_activation_checkpointing(model) if checkpointed else model


def inputs(model, n_ids=None, seed=1):
    """A batch of 2 rows the model accepts, MASK ids included in non-causal mode; and stream ids if any."""
    cfg = model.config
    n_ids = n_ids or cfg.max_input_ids
    g = torch.Generator().manual_seed(seed)
    high, mask = (2, MASK) if cfg.representation == "bit" else (256, BYTE_MASK)
    x = torch.randint(0, high, (2, n_ids), generator=g)
    if not cfg.causal:
        x[:, ::4] = mask
    stream = torch.tensor([0, 1]) if cfg.n_streams > 1 else None
    return x, stream


def assert_same_logits(old, new, x, stream):
    # with grad on, the reversible and checkpointed stacks take their training paths; without, the plain ones
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            expected, _ = old(x, stream=stream)
            got, _ = new(x, stream=stream)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_expansion_preserves_logits(variant, kind):
    old = make(variant)
    new = expand_model(old, kind, generator=seeded())
    assert_same_logits(old, new, *inputs(old))


@pytest.mark.parametrize("variant", ["flat", "patched-reversible"])
@pytest.mark.parametrize("kinds", [("depth", "depth"), ("width", "width"), ("depth", "width", "context")])
def test_repeated_expansions_preserve_logits(variant, kinds):
    old = make(variant)
    new = old
    for i, kind in enumerate(kinds):
        new = expand_model(new, kind, add_layers=2, generator=seeded(i))
    assert_same_logits(old, new, *inputs(old))


def test_depth_and_width_grow_the_parameter_count_and_context_grows_the_positions():
    old = make("patched")
    depth = expand_model(old, "depth", add_layers=2, generator=seeded())
    width = expand_model(old, "width", generator=seeded())
    context = expand_model(old, "context")
    assert depth.config.n_layers == 3 and len(depth.body.stack.blocks) == 3
    assert width.config.d_ff == 64 and width.body.stack.blocks[0].mlp[0].out_features == 64
    assert old.num_parameters() < depth.num_parameters() == count_parameters(depth.config)
    assert old.num_parameters() < width.num_parameters() == count_parameters(width.config)
    assert context.num_parameters() == old.num_parameters()
    assert context.body.positions.shape[0] == 2 * old.body.positions.shape[0] - 1  # patched: + BOS row


@pytest.mark.parametrize("kind", ["depth", "width"])
def test_same_generator_seed_builds_identical_models(kind):
    old = make()
    a = expand_model(old, kind, generator=seeded(7)).state_dict()
    b = expand_model(old, kind, generator=seeded(7)).state_dict()
    c = expand_model(old, kind, generator=seeded(8)).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the generator, not a fixed seed, draws the new weights


def test_expansion_with_a_generator_leaves_the_global_rng_alone():
    old = make()
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    expand_model(old, "depth", generator=seeded())
    assert torch.equal(torch.rand(4), expected)


def test_new_blocks_write_nothing_but_read_randomly():
    new = expand_model(make(), "depth", generator=seeded())
    block = new.body.stack.blocks[-1]
    for linear in (block.attn.proj, block.mlp[2]):
        assert not linear.weight.any() and not linear.bias.any()
    for linear in (block.attn.qkv, block.mlp[0]):
        assert 0.01 < float(linear.weight.detach().std()) < 0.03


def test_depth_expansion_of_an_act_model_raises():
    with pytest.raises(ValueError, match="model.act"):
        expand_model(make(act=True), "depth", generator=seeded())


def test_unknown_kinds_and_wrapped_models_are_rejected():
    with pytest.raises(ValueError, match="expansion kind"):
        expand_model(make(), "heads")
    with pytest.raises(TypeError, match="BitTransformerLM"):
        expand_model(torch.nn.Linear(2, 2), "depth")


@pytest.mark.parametrize("kind", KINDS)
def test_input_model_is_untouched(kind):
    old = make("reversible")
    config = old.config
    before = {k: v.clone() for k, v in old.state_dict().items()}
    expand_model(old, kind, generator=seeded())
    assert old.config == config and len(old.body.stack.blocks) == config.n_layers
    after = old.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("training", [True, False])
def test_expanded_model_keeps_mode_dtype_and_reference_marginals(training):
    old = make().double().train(training)
    old.set_reference_marginals(torch.linspace(0.1, 0.9, old.config.bits_per_byte))
    new = expand_model(old, "width", generator=seeded())
    assert new.training is training
    assert all(p.dtype == torch.float64 for p in new.parameters())
    assert next(new.parameters()).device == next(old.parameters()).device
    torch.testing.assert_close(new.reference_marginals, old.reference_marginals, atol=0, rtol=0)


def test_expanded_model_trains_its_zero_initialised_weights():
    old = make("flat")
    batch = torch.randint(0, 256, (2, CONTEXT_BYTES), dtype=torch.uint8, generator=seeded(2))
    deep = expand_model(old, "depth", generator=seeded()).train()
    out = causal_loss(deep, batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    block = deep.body.stack.blocks[-1]
    assert block.attn.proj.weight.grad.abs().sum() > 0
    assert block.mlp[2].weight.grad.abs().sum() > 0
    wide = expand_model(old, "width", generator=seeded()).train()
    out = causal_loss(wide, batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    new_columns = wide.body.stack.blocks[0].mlp[2].weight.grad[:, old.config.d_ff:]
    assert new_columns.abs().sum() > 0


@pytest.mark.parametrize("variant", ["flat", "patched", "byte"])
def test_context_expansion_accepts_twice_longer_inputs(variant):
    old = make(variant)
    new = expand_model(old, "context")
    x, _ = inputs(new)
    assert x.shape[1] == 2 * old.config.max_input_ids
    with pytest.raises(ValueError, match="exceeds"):
        old(x)
    logits, _ = new(x)
    assert logits.shape[:2] == x.shape and torch.isfinite(logits).all()


def test_plateau_detector_triggers_on_a_flat_sequence_once_two_windows_are_seen():
    detector = PlateauDetector(window=3, improve_thresh=0.01)
    flags = [detector.update(2.0) for _ in range(7)]
    assert flags == [False] * 5 + [True, True]


def test_plateau_detector_stays_quiet_while_loss_keeps_improving():
    detector = PlateauDetector(window=3, improve_thresh=0.01)
    assert not any(detector.update(3.0 * 0.97 ** i) for i in range(40))


def test_plateau_detector_reset_forgets_the_history():
    detector = PlateauDetector(window=2, improve_thresh=0.05)
    assert [detector.update(1.0) for _ in range(4)][-1]
    detector.reset()
    assert [detector.update(1.0) for _ in range(4)] == [False, False, False, True]


def test_plateau_detector_state_round_trips_through_json():
    detector = PlateauDetector(window=2, improve_thresh=0.05)
    for loss in (3.0, 2.0, 1.9):
        detector.update(loss)
    restored = PlateauDetector(window=1, improve_thresh=0.0)
    restored.load_state_dict(json.loads(json.dumps(detector.state_dict())))
    assert restored.state_dict() == detector.state_dict()
    assert restored.update(1.89) == detector.update(1.89)
    assert restored.relative_improvement() == pytest.approx(detector.relative_improvement())


def test_plateau_detector_rejects_an_empty_window():
    with pytest.raises(ValueError, match="window"):
        PlateauDetector(window=0, improve_thresh=0.01)


def test_next_expansion_cycles_through_the_configured_order():
    assert [next_expansion(ScalingConfig(), n) for n in range(4)] == ["depth", "width", "context", "depth"]
    assert [next_expansion(ScalingConfig(order="width, depth"), n) for n in range(3)] == ["width", "depth", "width"]


def test_count_parameters_matches_a_built_model():
    model = make("patched", n_streams=2)
    assert count_parameters(model.config) == model.num_parameters()


def test_can_expand_refuses_beyond_max_parameters_with_a_reason():
    cfg = make().config
    tight = ScalingConfig(max_parameters=count_parameters(cfg) + 1)
    ok, why = can_expand(cfg, "depth", tight, context_bytes=CONTEXT_BYTES)
    assert not ok and "max_parameters" in why
    assert not can_expand(cfg, "width", tight, context_bytes=CONTEXT_BYTES)[0]
    assert can_expand(cfg, "context", tight, context_bytes=CONTEXT_BYTES) == (True, "")  # positions are no parameters
    roomy = ScalingConfig(max_parameters=count_parameters(expanded_config(cfg, "depth")))
    assert can_expand(cfg, "depth", roomy, context_bytes=CONTEXT_BYTES) == (True, "")


def test_can_expand_refuses_beyond_max_context_bytes_with_a_reason():
    cfg = make().config
    scaling = ScalingConfig(max_context_bytes=128)
    assert can_expand(cfg, "context", scaling, context_bytes=64) == (True, "")
    ok, why = can_expand(cfg, "context", scaling, context_bytes=65)
    assert not ok and "max_context_bytes" in why


def test_can_expand_refuses_depth_for_act_models():
    ok, why = can_expand(make(act=True).config, "depth", ScalingConfig(), context_bytes=CONTEXT_BYTES)
    assert not ok and "model.act" in why


def test_expanded_lr_scale_decays_per_expansion_and_rewarms_linearly():
    cfg = ScalingConfig(lr_decay=2.0, rewarm_steps=10)
    assert expanded_lr_scale(cfg, 0, 0) == 1.0
    assert expanded_lr_scale(cfg, 1, 0) == pytest.approx(0.5 * 0.1)
    assert expanded_lr_scale(cfg, 1, 4) == pytest.approx(0.5 * 0.5)
    assert expanded_lr_scale(cfg, 1, 500) == pytest.approx(0.5)
    assert expanded_lr_scale(cfg, 2, 9) == pytest.approx(0.25)
    assert expanded_lr_scale(dataclasses.replace(cfg, rewarm_steps=0), 3, 0) == pytest.approx(0.125)
