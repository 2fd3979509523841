"""The recipe options (norm, mlp, qk_norm, rotary positions, zero inits) on all three models."""

import copy
import dataclasses

import pytest
import torch

from bitlm import checkpoint as ckpt
from bitlm.attention import KVCache, SelfAttention, rotate
from bitlm.config import ExperimentConfig, ModelConfig, apply_overrides
from bitlm.distill import widen
from bitlm.model import BitTransformerLM
from bitlm.parallel import apply_activation_checkpointing
from bitlm.pipelining import prune_to_stage
from bitlm.scaling import expand_model

KINDS = {  # (config, ids per input row, id range)
    "flat": (ModelConfig.from_name("tiny", kind="flat", max_positions=128), 72, 2),
    "patched": (ModelConfig.from_name("tiny", kind="patched", max_positions=16), 90, 2),
    "byte": (ModelConfig.from_name("tiny", kind="byte", max_positions=64), 40, 256),
}
ALL_ON = {"norm": "rms", "mlp": "swiglu", "qk_norm": True, "position_encoding": "rotary",
          "zero_init_residual": True, "zero_init_head": True}
OPTIONS = {
    "rms": {"norm": "rms"},
    "relu2": {"mlp": "relu2"},
    "swiglu": {"mlp": "swiglu"},
    "qk_norm": {"qk_norm": True},
    "rotary": {"position_encoding": "rotary"},
    "zero_init_residual": {"zero_init_residual": True},
    "zero_init_head": {"zero_init_head": True},
    "all": ALL_ON,
}
CASES = [(kind, option) for kind in KINDS for option in OPTIONS]


def make(kind, options, *, seed=0, trained=True, **more):
    """A model of `kind` with `options`; trained=True moves every weight off its init.

    Zero-initialised projections would make causality and decoding tests pass trivially (a block
    that adds 0 reads nothing), so the tests run on weights as training leaves them: perturbed.
    """
    torch.manual_seed(seed)
    model = BitTransformerLM(dataclasses.replace(KINDS[kind][0], **options, **more)).eval()
    if trained:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model


def random_ids(kind, batch=2, seed=1):
    _, length, n_values = KINDS[kind]
    return torch.randint(0, n_values, (batch, length), generator=torch.Generator().manual_seed(seed))


def flip(x, t):
    flipped = x.clone()
    flipped[:, t] ^= 1  # a bit flips; a byte id changes its last bit
    return flipped


@pytest.mark.parametrize("kind, option", CASES)
def test_changing_id_t_never_changes_earlier_logits(kind, option):
    model = make(kind, OPTIONS[option])
    x = random_ids(kind)
    base, _ = model(x)
    last = x.shape[1] - 1
    for t in (0, 8, 9, 17, 30, last):  # across byte boundaries of the bit models
        out, _ = model(flip(x, t))
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
        if t < last:
            assert not torch.allclose(out[:, t:], base[:, t:]), f"id {t} influences nothing after it"


@pytest.mark.parametrize("kind, option", CASES)
def test_incremental_decoding_equals_the_full_forward(kind, option):
    model = make(kind, OPTIONS[option])
    x = random_ids(kind)
    full, _ = model(x)
    state, first = model.start_decoding(x[:, :22])  # inside a byte for the bit models
    pieces = [first]
    for t in range(22, x.shape[1] - 1):
        pieces.append(model.decode_next(state, x[:, t]))
    torch.testing.assert_close(torch.stack(pieces, dim=1), full[:, 21:-1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind, option", CASES)
def test_save_then_load_gives_identical_logits(kind, option, tmp_path):
    model = make(kind, OPTIONS[option])
    ckpt.save_pretrained(model, tmp_path / "m")
    loaded = ckpt.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == model.config
    x = random_ids(kind)
    assert torch.equal(model(x)[0], loaded(x)[0])


def _stages(model):
    """The two pipeline stages of a 2-layer model, each a copy pruned as PipelineStrategy.wrap prunes it."""
    first, last = copy.deepcopy(model), copy.deepcopy(model)
    prune_to_stage(first, range(0, 1), is_first=True, is_last=False)
    prune_to_stage(last, range(1, 2), is_first=False, is_last=True)
    return first, last


@pytest.mark.parametrize("kind, option", CASES)
def test_two_pipeline_stages_compute_the_full_models_logits(kind, option):
    model = make(kind, OPTIONS[option])
    first, last = _stages(model)
    x = random_ids(kind)
    hidden = first(x, causal=True, readout=False)[0]
    assert hidden.shape[-1] == model.config.d_model and hidden.is_floating_point()
    logits = last.readout(last(hidden, causal=True, readout=False)[0], x)
    torch.testing.assert_close(logits, model(x)[0], atol=1e-5, rtol=1e-4)
    names = [n for stage in (first, last) for n, _ in stage.named_parameters()]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # disjoint, together all


def _grads(model, x):
    model.zero_grad()
    logits, _ = model(x)
    (logits.float().square().mean() + logits[..., 1].mean()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind, option", CASES)
def test_reversible_backward_matches_plain_autograd_of_the_coupling(kind, option):
    model = make(kind, OPTIONS[option], reversible=True).train()
    x = random_ids(kind)
    custom = _grads(model, x)  # through the custom Function that rebuilds activations
    stack = model.body.stack
    stack._reversible = lambda h, causal, per_layer: stack._coupled_inference(h, causal, None, False)
    reference = _grads(model, x)
    assert custom.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(custom[name], reference[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_activation_checkpointing_gives_the_same_gradients_with_every_option(kind):
    x = random_ids(kind)
    plain = _grads(make(kind, ALL_ON).train(), x)
    checkpointed = _grads(apply_activation_checkpointing(make(kind, ALL_ON).train()), x)
    assert checkpointed.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_reversible_models_stay_causal_and_decode_like_their_forward(kind):
    model = make(kind, ALL_ON, reversible=True)
    x = random_ids(kind)
    base, _ = model(x)
    out, _ = model(flip(x, 30))
    torch.testing.assert_close(out[:, :30], base[:, :30], atol=1e-6, rtol=0)
    state, first = model.start_decoding(x[:, :22])
    pieces = [first] + [model.decode_next(state, x[:, t]) for t in range(22, x.shape[1] - 1)]
    torch.testing.assert_close(torch.stack(pieces, dim=1), base[:, 21:-1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["flat", "byte"])
@pytest.mark.parametrize("causal", [True, False])
def test_rotary_chunked_attention_is_block_local_and_equals_full_when_the_chunk_covers_the_input(kind, causal):
    rotary = {"position_encoding": "rotary"}
    x = random_ids(kind)[:, :38]  # not a multiple of the chunk: exercises padding
    chunked = make(kind, rotary, causal=causal, chunk_size=16)
    base, _ = chunked(x)
    out, _ = chunked(flip(x, 5))  # chunk 0
    torch.testing.assert_close(out[:, 16:], base[:, 16:], atol=1e-6, rtol=0)
    assert not torch.allclose(out[:, 5:16], base[:, 5:16])
    full, _ = make(kind, rotary, causal=causal)(x)
    torch.testing.assert_close(make(kind, rotary, causal=causal, chunk_size=64)(x)[0], full)


@pytest.mark.parametrize("kind", KINDS)
def test_rotary_chunked_decoding_equals_the_full_forward(kind):
    model = make(kind, {"position_encoding": "rotary"}, chunk_size=4 if kind == "patched" else 16)
    x = random_ids(kind)
    full, _ = model(x)
    state, first = model.start_decoding(x[:, :22])
    pieces = [first] + [model.decode_next(state, x[:, t]) for t in range(22, x.shape[1] - 1)]
    torch.testing.assert_close(torch.stack(pieces, dim=1), full[:, 21:-1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_rotary_non_causal_mode_sees_later_ids_and_adds_no_position_table(kind):
    model = make(kind, {"position_encoding": "rotary"}, causal=False)
    assert model.body.positions is None
    x = random_ids(kind)
    base, _ = model(x)
    out, _ = model(flip(x, 80 if kind == "patched" else 30))
    assert not torch.allclose(out[:, :9], base[:, :9])


def test_rotary_scores_depend_only_on_the_distance_between_positions():
    q, k = torch.randn(2, 1, 5, 16, generator=torch.Generator().manual_seed(0)).unbind(0)
    scores = [rotate(q[None], s) @ rotate(k[None], s).transpose(-2, -1) for s in (0, 7, 1000)]
    torch.testing.assert_close(scores[1], scores[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scores[2], scores[0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(scores[0], q[None] @ k[None].transpose(-2, -1))  # it does rotate


def test_rotary_decoding_rotates_by_the_caches_length():
    torch.manual_seed(0)
    attn = SelfAttention(64, 4, 0.0, None, rotary=True).eval()
    cache = KVCache(1, 2, 4, 16, capacity=12)
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(3))
    full, _ = attn(x, causal=True)
    head, _ = attn(x[:, :7], causal=True, cache=cache)
    cache.advance(7)
    tail, _ = attn(x[:, 7:], causal=True, cache=cache)
    torch.testing.assert_close(torch.cat([head, tail], dim=1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_qk_norm_makes_attention_weights_independent_of_the_input_scale(qk_norm):
    torch.manual_seed(0)
    attn = SelfAttention(64, 4, 0.0, None, qk_norm=qk_norm).eval()
    with torch.no_grad():  # scores large enough to tell apart, and q, k proportional to x
        attn.qkv.weight.normal_(0, 0.3)
        attn.qkv.bias.zero_()
    x = torch.randn(1, 10, 64, generator=torch.Generator().manual_seed(2))
    _, small = attn(x, causal=True, return_weights=True)
    _, large = attn(8 * x, causal=True, return_weights=True)
    assert torch.allclose(small, large, atol=1e-4) == qk_norm
    if qk_norm:
        assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (16,)


@pytest.mark.parametrize("kind", KINDS)
def test_rms_norm_replaces_every_layer_norm(kind):
    default = make(kind, {}, trained=False)
    rms = make(kind, {"norm": "rms"}, trained=False)
    n_layer_norms = sum(isinstance(m, torch.nn.LayerNorm) for m in default.modules())
    assert n_layer_norms >= 3  # two per block at least, and the final norm
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in rms.modules())
    assert sum(isinstance(m, torch.nn.RMSNorm) for m in rms.modules()) == n_layer_norms


def test_relu2_and_swiglu_compute_their_definitions():
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    relu2 = make("flat", {"mlp": "relu2"}).body.stack.blocks[0].mlp
    up, down = relu2[0], relu2[2]
    torch.testing.assert_close(relu2(x), down(torch.relu(up(x)) ** 2))
    swiglu = make("flat", {"mlp": "swiglu"}).body.stack.blocks[0].mlp
    up, down = swiglu[0], swiglu[2]
    gate = x @ up.weight[0::2].T + up.bias[0::2]  # W1 x: unit i's gate is row 2 i
    value = x @ up.weight[1::2].T + up.bias[1::2]  # W3 x
    torch.testing.assert_close(swiglu(x), down(torch.nn.functional.silu(gate) * value))


def test_swiglu_keeps_d_ff_hidden_units_with_one_and_a_half_times_the_mlp_weights():
    gelu = make("flat", {}, trained=False).body.stack.blocks[0].mlp
    swiglu = make("flat", {"mlp": "swiglu"}, trained=False).body.stack.blocks[0].mlp
    assert swiglu[2].in_features == gelu[2].in_features == 256
    n_gelu = gelu[0].weight.numel() + gelu[2].weight.numel()
    assert swiglu[0].weight.numel() + swiglu[2].weight.numel() == 1.5 * n_gelu


@pytest.mark.parametrize("kind", KINDS)
def test_zero_init_residual_starts_every_block_as_the_identity(kind):
    model = make(kind, {"zero_init_residual": True}, trained=False)
    h = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(model.body.stack(h, causal=True).hidden, h, atol=0, rtol=0)
    plain = make(kind, {}, trained=False)
    assert not torch.allclose(plain.body.stack(h, causal=True).hidden, h)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_init_head_starts_every_logit_at_its_bias(kind):
    model = make(kind, {"zero_init_head": True}, trained=False)
    logits, _ = model(random_ids(kind))
    if kind == "patched":  # z = 0, so bit 1's score is its node's bias
        head = model.body.to_local[0]
        assert torch.count_nonzero(model.body.to_local(torch.randn(4, 64))) == 0
    else:
        head = model.body.head
        assert torch.count_nonzero(logits) == 0  # the head's bias starts at 0 too
    logits[..., 1].sum().backward()
    assert torch.count_nonzero(head.weight) == 0 and torch.count_nonzero(head.weight.grad) > 0  # training moves it


def test_zero_init_head_keeps_z_zero_through_local_residual_mlps():
    model = make("patched", {"zero_init_head": True}, trained=False, n_local_layers=2)
    assert torch.count_nonzero(model.body.to_local(torch.randn(4, 64))) == 0


@pytest.mark.parametrize("grow", ["depth", "width", "widen"])
def test_growing_a_model_with_every_option_keeps_its_logits(grow):
    model = make("flat", ALL_ON)
    x = random_ids("flat")
    grown = widen(model, 2.0) if grow == "widen" else expand_model(model, grow)
    torch.testing.assert_close(grown.eval()(x)[0], model(x)[0], atol=1e-5, rtol=1e-4)


# The default config's tensors, as written by the code before these options (commit c7c48fe):
# tiny preset, one layer; the block's entries are under body.stack.blocks.0.
BLOCK = ("ln1.weight:64 ln1.bias:64 attn.qkv.weight:192x64 attn.qkv.bias:192 attn.proj.weight:64x64 "
         "attn.proj.bias:64 ln2.weight:64 ln2.bias:64 mlp.0.weight:256x64 mlp.0.bias:256 mlp.2.weight:64x256 "
         "mlp.2.bias:64")
BODIES = {
    "flat": "reference_marginals:9 body.embed.weight:3x64 body.phase.weight:9x64 body.norm.weight:64 "
            "body.norm.bias:64 body.head.weight:2x64 body.head.bias:2",
    "patched": "reference_marginals:9 body.bos:64 body.byte_bits.weight:27x64 body.byte_mlp.net.0.weight:64 "
               "body.byte_mlp.net.0.bias:64 body.byte_mlp.net.1.weight:128x64 body.byte_mlp.net.1.bias:128 "
               "body.byte_mlp.net.3.weight:64x128 body.byte_mlp.net.3.bias:64 body.norm.weight:64 body.norm.bias:64 "
               "body.to_local.0.weight:128x64 body.to_local.0.bias:128 body.node_vectors.weight:520x128 "
               "body.node_bias.weight:520x1",
    "byte": "reference_marginals:9 body.embed.weight:257x64 body.norm.weight:64 body.norm.bias:64 "
            "body.head.weight:256x64 body.head.bias:256",
}


@pytest.mark.parametrize("kind", KINDS)
def test_the_default_config_builds_the_tensors_it_always_had(kind):
    model = BitTransformerLM(ModelConfig.from_name("tiny", kind=kind, n_layers=1))
    block = "body.stack.blocks.0."
    state = {k: "x".join(map(str, v.shape)) for k, v in model.state_dict().items()}
    assert " ".join(f"{k}:{s}" for k, s in state.items() if not k.startswith(block)) == BODIES[kind]
    assert " ".join(f"{k[len(block):]}:{s}" for k, s in state.items() if k.startswith(block)) == BLOCK
    assert isinstance(model.body.positions, torch.Tensor)  # the sinusoidal table is still added


@pytest.mark.parametrize("key, bad", [
    ("norm", "batch"), ("mlp", "geglu"), ("qk_norm", "yes"), ("position_encoding", "alibi"),
    ("zero_init_residual", 1), ("zero_init_head", None),
])
def test_bad_values_are_refused_naming_the_key(key, bad):
    with pytest.raises(ValueError, match=f"model.{key}"):
        ModelConfig(**{key: bad})


def test_rotary_needs_an_even_head_dimension():
    with pytest.raises(ValueError, match="model.position_encoding"):
        ModelConfig(d_model=12, n_heads=4, position_encoding="rotary")


def test_the_options_are_set_from_the_command_line():
    cfg = apply_overrides(ExperimentConfig(), [f"model.{k}={str(v).lower()}" for k, v in ALL_ON.items()])
    assert {k: getattr(cfg.model, k) for k in ALL_ON} == ALL_ON
    with pytest.raises(ValueError, match="model.mlp"):
        apply_overrides(ExperimentConfig(), ["model.mlp=swish"])


def test_rotary_angles_read_from_the_kept_table_equal_computing_them_for_each_call():
    from bitlm import attention

    attention._ROTARY_TABLES.clear()
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 3, 5, 16).to(dtype)
        for start in (0, 7, 1020, 5000):  # the last two grow the table past its first 1,024 positions
            cos, sin = attention._rotary_angles(start, start + 5, 16, x.device, dtype)
            x1, x2 = x[..., :8], x[..., 8:]
            assert torch.equal(rotate(x, start), torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1))
    assert attention._ROTARY_TABLES[(16, "cpu", torch.float32)][0].shape[0] >= 5005


def test_a_rotary_table_built_while_sampling_serves_a_training_backward():
    from bitlm import attention

    attention._ROTARY_TABLES.clear()
    with torch.inference_mode():
        rotate(torch.randn(1, 2, 3, 8), 0)
    x = torch.randn(1, 2, 3, 8, requires_grad=True)
    rotate(x, 1).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
