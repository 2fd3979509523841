"""model.input_conv: the depthwise convolution over the stack inputs, in all three models."""

import copy
import dataclasses

import pytest
import torch

from decoding_checks import assert_incremental_decoding_equals_full_forward

from bitlm.checkpoint import from_pretrained, save_pretrained
from bitlm.config import ModelConfig, TrainConfig, from_dict, to_dict
from bitlm.input_conv import InputConv
from bitlm.model import BitTransformerLM
from bitlm.optim import build_optimizer
from bitlm.pipelining import prune_to_stage
from bitlm.sampling import generate_ids

KINDS = ("flat", "patched", "byte")
KERNEL = 5


def make(kind: str, input_conv: int = KERNEL, **changes) -> BitTransformerLM:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", kind=kind, input_conv=input_conv, **changes)
    return BitTransformerLM(cfg).eval()


def random_ids(model: BitTransformerLM, n_ids: int = 72, batch: int = 2, seed: int = 1) -> torch.Tensor:
    """(batch, n_ids) ids: 8 bytes of bits, or 72 bytes for the byte model."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256 if model.config.representation == "byte" else 2, (batch, n_ids), generator=g)


def flipped(model: BitTransformerLM, ids: torch.Tensor, t: int) -> torch.Tensor:
    out = ids.clone()
    out[:, t] = (out[:, t] + 1) % (2 if model.config.representation == "bit" else 256)
    return out


def test_the_causal_window_reads_the_last_kernel_positions_and_the_centred_one_both_sides():
    conv = InputConv(1, 4)
    with torch.no_grad():
        conv.conv.weight.fill_(1.0)
        conv.conv.bias.zero_()
    impulse = torch.zeros(1, 10, 1)
    impulse[0, 5, 0] = 1.0
    reached = lambda causal: (conv(impulse, causal=causal) - impulse)[0, :, 0].nonzero().flatten().tolist()  # noqa: E731
    assert reached(True) == [5, 6, 7, 8]  # positions 5..8 read position 5
    assert reached(False) == [3, 4, 5, 6]  # position t reads t-1 .. t+2 (kernel 4: (k-1)//2 back, k//2 ahead)


@pytest.mark.parametrize("kind", KINDS)
def test_a_zero_kernel_gives_the_model_without_the_convolution(kind):
    model = make(kind)
    with torch.no_grad():
        model.body.input_conv.conv.weight.zero_()
        model.body.input_conv.conv.bias.zero_()
    plain = make(kind, input_conv=0)
    state = {k: v for k, v in model.state_dict().items() if "input_conv" not in k}
    plain.load_state_dict(state, strict=True)
    ids = random_ids(model)
    torch.testing.assert_close(model(ids)[0], plain(ids)[0], rtol=0, atol=0)
    assert not torch.equal(make(kind)(ids)[0], plain(ids)[0])  # the trained-from-init kernel does change them


@pytest.mark.parametrize("kind", KINDS)
def test_logits_before_a_flipped_input_do_not_change(kind):
    model = make(kind)
    ids = random_ids(model)
    full, _ = model(ids)
    for t in (1, 13, ids.shape[1] - 4):  # mid-byte, a byte boundary region, near the end
        changed, _ = model(flipped(model, ids, t))
        # logits[:, s] predict id s + 1 from ids <= s: everything before t must be bit-for-bit the same
        torch.testing.assert_close(changed[:, :t], full[:, :t], rtol=0, atol=0)
        assert not torch.equal(changed[:, t:], full[:, t:])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prefix", [1, 3, 22, 40])
def test_kv_cache_decoding_equals_the_full_forward(kind, prefix):
    model = make(kind)
    assert_incremental_decoding_equals_full_forward(model, random_ids(model), prompt_bits=prefix)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_generation_equals_full_recompute_past_the_context(kind):
    model = make(kind, max_positions=36 if kind == "flat" else 6)  # 4 bytes of bits, or 6 bytes
    prompt = random_ids(model, n_ids=9 if kind != "byte" else 2, batch=1)
    n_new = 60 if kind != "byte" else 12
    unit = "byte" if kind == "byte" else "bit"  # the recompute path samples bits (patched byte-at-once: below)
    cached = generate_ids(model, prompt, n_new, temperature=0, sampling_unit=unit)
    assert torch.equal(cached, generate_ids(model, prompt, n_new, temperature=0, use_cache=False))


def test_byte_at_once_sampling_reads_the_convolution_history():
    """The joint of a byte from the tree equals the bit-by-bit conditionals when push_byte carries the inputs."""
    model = make("patched")
    prompt = random_ids(model, n_ids=27, batch=2)
    state, _ = model.start_decoding(prompt)
    body = model.body
    body.push_byte(state, prompt[:, :9])  # one more byte through the conv history
    joint = body.next_byte_log_probs(state).exp()  # (B, 512)
    pattern = joint.argmax(-1)
    bits = body.pattern_bits[pattern]  # (B, 9)
    full_ids = torch.cat([prompt, prompt[:, :9], bits], dim=1)
    logits, _ = model(full_ids)
    start = prompt.shape[1] + 9
    log_p = torch.log_softmax(logits[:, start - 1:start + 8].float(), -1).gather(-1, bits[..., None]).sum((1, 2))
    torch.testing.assert_close(joint.gather(-1, pattern[:, None]).squeeze(-1).log(), log_p, atol=1e-4, rtol=1e-4)


def test_a_flat_forward_on_a_filled_cache_without_the_inputs_is_refused():
    model = make("byte")
    ids = random_ids(model)
    cache = model.new_cache(ids.shape[0])
    model(ids[:, :4], cache=cache)
    with pytest.raises(ValueError, match="model.input_conv"):
        model(ids[:, 4:5], cache=cache)


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_round_trip(kind, tmp_path):
    model = make(kind)
    save_pretrained(model, tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m").eval()
    assert loaded.config.input_conv == KERNEL
    ids = random_ids(model)
    torch.testing.assert_close(loaded(ids)[0], model(ids)[0], rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_two_pipeline_stages_compute_the_full_model_and_the_first_owns_the_convolution(kind):
    model = make(kind)
    first, last = copy.deepcopy(model), copy.deepcopy(model)
    prune_to_stage(first, range(0, 1), is_first=True, is_last=False)
    prune_to_stage(last, range(1, 2), is_first=False, is_last=True)
    assert first.body.input_conv is not None and last.body.input_conv is None
    assert not any("input_conv" in n for n, _ in last.named_parameters())
    ids = random_ids(model)
    hidden = first(ids, causal=True, readout=False)[0]
    features = last(hidden, causal=True, readout=False)[0]
    torch.testing.assert_close(last.readout(features, ids), model(ids)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_without_the_option_the_weights_and_config_are_those_of_before(kind):
    model = make(kind, input_conv=0)
    assert model.body.input_conv is None
    assert not any("input_conv" in k for k in model.state_dict())
    saved = to_dict(model.config)
    del saved["input_conv"]  # a config.json written before the option existed
    assert from_dict(ModelConfig, saved) == model.config


@pytest.mark.parametrize("kind", ["flat", "patched"])
def test_non_causal_models_use_the_centred_window(kind):
    model = make(kind, causal=False)
    ids = random_ids(model)
    logits, _ = model(ids, causal=False)
    with torch.no_grad():
        model.body.input_conv.conv.weight.zero_()
        model.body.input_conv.conv.bias.zero_()
    assert not torch.equal(model(ids, causal=False)[0], logits)


def test_the_convolution_trains_with_adamw_under_muon():
    model = make("patched")
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon"))
    adamw = {id(p) for g in optimizer.adamw.param_groups for p in g["params"]}
    assert all(id(p) in adamw for p in model.body.input_conv.parameters())


@pytest.mark.parametrize("value", [-1, 65])
def test_out_of_range_kernels_are_refused_naming_the_field(value):
    with pytest.raises(ValueError, match=r"^model.input_conv: must be in \[0, 64\]"):
        ModelConfig(input_conv=value)
    with pytest.raises(ValueError, match=r"^model.input_conv: expected int"):
        from_dict(ModelConfig, {"input_conv": 4.0})
    assert dataclasses.replace(ModelConfig(), input_conv=64).input_conv == 64


def test_a_decoding_steps_weighted_sum_equals_the_convolution_over_the_same_window():
    torch.manual_seed(0)
    conv = InputConv(12, 4)
    window = torch.randn(2, 4, 12)  # 3 history vectors and the new input
    step = conv(window[:, 3:], causal=True, history=window[:, :3])
    torch.testing.assert_close(step, conv(window, causal=True)[:, 3:], atol=1e-6, rtol=1e-6)
    assert step.shape == (2, 1, 12)
