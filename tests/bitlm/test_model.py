"""BitTransformerLM: causality, option equivalences, KV cache, telemetry outputs."""

import dataclasses

import pytest
import torch

from bitlm.config import ModelConfig
from bitlm.model import MASK, BitTransformerLM
from bitlm.parallel import apply_activation_checkpointing

TINY = ModelConfig.from_name("tiny", max_positions=128)
OPTIONS = {
    "plain": {},
    "reversible": {"reversible": True},
    "checkpointed": {"checkpoint_activations": True},
    "chunked": {"chunk_size": 16},
    "act": {"act": True},
}


def make(seed=0, **overrides):
    torch.manual_seed(seed)
    checkpointed = overrides.pop("checkpoint_activations", False)  # applied from outside the model
    model = BitTransformerLM(dataclasses.replace(TINY, **overrides)).eval()
    return apply_activation_checkpointing(model) if checkpointed else model


def random_bits(batch=2, length=72, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (batch, length), generator=g)


@pytest.mark.parametrize("option", OPTIONS)
def test_changing_bit_t_never_changes_earlier_logits(option):
    model = make(**OPTIONS[option])
    x = random_bits()
    base, _ = model(x)
    for t in (0, 17, 40, 71):
        flipped = x.clone()
        flipped[:, t] ^= 1
        out, _ = model(flipped)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
        if t < 71:  # the flipped bit itself is seen by its own position's prediction
            assert not torch.allclose(out[:, t], base[:, t])


def test_non_causal_mode_sees_later_bits():
    model = make(causal=False)
    x = random_bits()
    base, _ = model(x)
    flipped = x.clone()
    flipped[:, 50] ^= 1
    out, _ = model(flipped)
    assert not torch.allclose(out[:, :50], base[:, :50])


def test_mask_id_is_accepted_and_out_of_range_ids_are_rejected():
    model = make(causal=False)
    x = random_bits()
    x[:, ::3] = MASK
    logits, _ = model(x)
    assert logits.shape == (2, 72, 2)
    with pytest.raises(ValueError, match="input ids must be in"):
        model(torch.full((1, 9), 3))


def _grads(model, x):
    model.zero_grad()
    logits, _ = model(x)
    (logits.float().square().mean() + logits[..., 1].mean()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _grads_plain_coupling(model, x):
    """Gradients of the same reversible coupling, computed by ordinary autograd."""
    original = model.body.stack._reversible
    model.body.stack._reversible = lambda h, causal, per_layer: model.body.stack._coupled_inference(h, causal, None, False)
    try:
        return _grads(model, x)
    finally:
        model.body.stack._reversible = original


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_reversible_backward_matches_plain_autograd(dropout):
    model = make(reversible=True, dropout=dropout, n_layers=3).train()
    x = random_bits()
    torch.manual_seed(123)
    custom = _grads(model, x)
    torch.manual_seed(123)  # same dropout masks in the plain run; the custom one must replay them
    reference = _grads_plain_coupling(model, x)
    assert custom.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(custom[name], reference[name], atol=1e-5, rtol=1e-4, msg=name)


def test_reversible_with_act_matches_plain_autograd():
    model = make(reversible=True, act=True, n_layers=3).train()
    x = random_bits()
    custom = _grads(model, x)
    reference = _grads_plain_coupling(model, x)
    for name in reference:
        torch.testing.assert_close(custom[name], reference[name], atol=1e-5, rtol=1e-4, msg=name)


def test_activation_checkpointing_gives_the_same_gradients():
    x = random_bits()
    plain = _grads(make(dropout=0.0).train(), x)
    checkpointed = _grads(make(dropout=0.0, checkpoint_activations=True).train(), x)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("causal", [True, False])
def test_chunked_attention_equals_full_attention_when_the_chunk_covers_the_sequence(causal):
    x = random_bits(length=72)
    full, _ = make(causal=causal)(x)
    chunked, _ = make(causal=causal, chunk_size=72)(x)
    bigger, _ = make(causal=causal, chunk_size=100)(x)
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(bigger, full)


@pytest.mark.parametrize("causal", [True, False])
def test_chunked_attention_is_block_local(causal):
    model = make(causal=causal, chunk_size=16)
    x = random_bits(length=70)  # not a multiple of the chunk: exercises padding
    base, _ = model(x)
    flipped = x.clone()
    flipped[:, 5] ^= 1  # chunk 0
    out, _ = model(flipped)
    torch.testing.assert_close(out[:, 16:], base[:, 16:], atol=1e-6, rtol=0)
    assert not torch.allclose(out[:, 5:16], base[:, 5:16])


@pytest.mark.parametrize("option", ["plain", "reversible", "chunked", "act"])
def test_kv_cache_logits_equal_full_forward(option):
    model = make(**OPTIONS[option])
    x = random_bits(length=60)
    full, _ = model(x)
    cache = model.new_cache(batch_size=2)
    pieces = [model(x[:, :23], cache=cache)[0]]  # a prefill, then one position at a time
    for t in range(23, 60):
        pieces.append(model(x[:, t:t + 1], cache=cache)[0])
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-4)


def test_kv_cache_refuses_non_causal_mode_and_overflow():
    model = make(causal=False)
    with pytest.raises(ValueError, match="causal"):
        model(random_bits(length=9), cache=model.new_cache(2))
    causal = make()
    cache = causal.new_cache(2, capacity=10)
    with pytest.raises(ValueError, match="KV cache full"):
        causal(random_bits(length=12), cache=cache)


def test_sequence_longer_than_context_is_rejected_with_a_pointer():
    model = make()
    with pytest.raises(ValueError, match="infer_long_sequence"):
        model(random_bits(length=129))


def test_telemetry_is_computed_only_when_asked():
    model = make()
    _, none = model(random_bits())
    assert none == {}
    _, tel = model(random_bits(), return_telemetry=True)
    for key in ("negentropy", "lz_complexity", "symbiosis"):
        assert tel[key].shape == (2,)
        assert 0.0 <= float(tel[key].min()) and float(tel[key].max()) <= 1.0


def test_act_reports_halt_probabilities_per_layer_and_position():
    model = make(act=True, n_layers=3)
    _, tel = model(random_bits(), return_telemetry=True)
    assert tel["halt_probs"].shape == (2, 3, 72)
    assert 0.0 <= float(tel["halt_probs"].min()) <= float(tel["halt_probs"].max()) <= 1.0
    assert tel["ponder_cost"].shape == (2, 72)


def test_act_halts_early_when_the_threshold_is_low():
    model = make(act=True, n_layers=4, act_threshold=0.05)
    _, tel = model(random_bits(), return_telemetry=True)
    # with the halting bias near sigmoid(-2) = 0.12, every position halts after its first layer
    assert float(tel["ponder_cost"].max()) < 4


def test_full_attention_logging_returns_row_stochastic_causal_maps():
    model = make(full_attn_logging=True, chunk_size=16)
    logits, tel = model(random_bits(length=40), return_telemetry=True)
    plain, _ = make(chunk_size=16)(random_bits(length=40))
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=1e-4)  # logging does not change outputs
    maps = tel["attention_maps"]
    assert len(maps) == TINY.n_layers and maps[0].shape == (2, TINY.n_heads, 40, 40)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, TINY.n_heads, 40))
    assert float(maps[0].triu(1).abs().max()) == 0.0
    assert float(maps[0][..., 20, :16].abs().max()) == 0.0  # position 20 (chunk 1) never sees chunk 0


def test_byte_baseline_reads_bytes_and_predicts_256_values():
    model = make(representation="byte")
    x = torch.randint(0, 256, (2, 30))
    logits, tel = model(x, return_telemetry=True)
    assert logits.shape == (2, 30, 256)
    assert tel["lz_complexity"].shape == (2,)


@pytest.mark.parametrize("name", ["tiny", "small", "base"])
def test_presets_build_and_forward(name):
    cfg = ModelConfig.from_name(name)
    model = BitTransformerLM(dataclasses.replace(cfg, max_positions=64))
    logits, _ = model(random_bits(batch=1, length=18))
    assert logits.shape == (1, 18, 2)
    assert model.num_parameters() > 0


def test_bit_and_byte_models_of_a_preset_have_nearly_equal_parameter_counts():
    bit = BitTransformerLM(ModelConfig.from_name("small"))
    byte = BitTransformerLM(ModelConfig.from_name("small", representation="byte", max_positions=256))
    assert bit.num_parameters(exclude_embeddings=True) == pytest.approx(
        byte.num_parameters(exclude_embeddings=True), rel=0.05)
