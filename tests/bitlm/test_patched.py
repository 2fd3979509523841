"""The byte-patched bit model: exact bit-level causality, decoding, options, layout shared with flat."""

import dataclasses

import pytest
import torch

from decoding_checks import assert_incremental_decoding_equals_full_forward

from bitlm import checkpoint as ckpt
from bitlm.config import ModelConfig
from bitlm.model import MASK, BitTransformerLM
from bitlm.objective import batch_loss as causal_loss
from bitlm.parallel import apply_activation_checkpointing
from bitlm.sampling import generate, generate_ids

PATCHED = ModelConfig.from_name("tiny", arch="patched", max_positions=16)
OPTIONS = {
    "plain": {},
    "reversible": {"reversible": True},
    "checkpointed": {"checkpoint_activations": True},
    "chunked": {"chunk_size": 4},
    "act": {"act": True},
}


def make(seed=0, **overrides):
    torch.manual_seed(seed)
    checkpointed = overrides.pop("checkpoint_activations", False)  # applied from outside the model
    model = BitTransformerLM(dataclasses.replace(PATCHED, **overrides)).eval()
    return apply_activation_checkpointing(model) if checkpointed else model


def random_bits(batch=2, n_bytes=10, bpb=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (batch, n_bytes * bpb), generator=g)


@pytest.mark.parametrize("option", OPTIONS)
def test_flipping_bit_t_never_changes_the_logits_of_bits_up_to_t(option):
    model = make(**OPTIONS[option])
    x = random_bits()
    base, _ = model(x)
    # logits[:, s] predicts bit s + 1, so bits <= t are predicted by logits[:, :t]
    for t in (0, 4, 8, 9, 13, 17, 40, 89):  # first, middle, last bit of a byte; across boundaries
        flipped = x.clone()
        flipped[:, t] ^= 1
        out, _ = model(flipped)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
        if t < 89:
            assert not torch.allclose(out[:, t:], base[:, t:]), f"bit {t} influences nothing after it"


@pytest.mark.parametrize("parity", [True, False])
def test_output_layout_matches_the_flat_model(parity):
    bpb = 9 if parity else 8
    patched = make(parity=parity)
    flat = BitTransformerLM(ModelConfig.from_name("tiny", parity=parity))
    x = random_bits(bpb=bpb)
    a, _ = patched(x)
    b, _ = flat(x)
    assert a.shape == b.shape == (2, 10 * bpb, 2)


def test_both_architectures_share_the_bpb_definition():
    batch = torch.randint(32, 127, (3, 12), dtype=torch.uint8)
    for arch in ("flat", "patched"):
        model = BitTransformerLM(ModelConfig.from_name("tiny", arch=arch)).eval()
        out = causal_loss(model, batch)
        assert out.n_bytes == 3 * 11
        ids = torch.as_tensor(batch, dtype=torch.long)
        from bitlm.codec import bytes_to_bit_tensor

        bits = bytes_to_bit_tensor(ids)
        logits, _ = model(bits)
        nll = torch.nn.functional.cross_entropy(logits[:, 8:-1].reshape(-1, 2), bits[:, 9:].reshape(-1),
                                                reduction="sum") / torch.log(torch.tensor(2.0))
        torch.testing.assert_close(out.nll_bits, nll, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("option", ["plain", "reversible", "chunked", "act"])
def test_incremental_decoding_equals_the_full_forward(option):
    assert_incremental_decoding_equals_full_forward(make(**OPTIONS[option]), random_bits(n_bytes=12))


def test_cached_generation_equals_full_recompute_and_runs_past_the_context():
    model = make()
    prompt = random_bits(batch=1, n_bytes=3)
    # bit by bit: the recompute reference samples one bit per step (greedy per byte is another sampler)
    cached = generate_ids(model, prompt, 9 * 30, temperature=0, sampling_unit="bit")  # 33 bytes > max_positions 16
    recomputed = generate_ids(model, prompt, 9 * 30, temperature=0, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_non_causal_mode_reads_masked_bits_and_sees_the_whole_sequence():
    model = make(causal=False)
    x = random_bits()
    x[:, ::4] = MASK
    base, _ = model(x)
    flipped = x.clone()
    flipped[:, 80] = 1 - flipped[:, 80].clamp(max=1)
    out, _ = model(flipped)
    assert not torch.allclose(out[:, :9], base[:, :9])  # byte 0 sees byte 8 without causality


def test_a_trailing_partial_byte_gives_the_prefix_of_the_whole_byte_logits():
    model = make()
    x = random_bits(n_bytes=3)
    whole, _ = model(x)
    partial, _ = model(x[:, :22])
    torch.testing.assert_close(partial, whole[:, :22], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="whole bytes"):
        make(causal=False)(x[:, :22])


def test_every_option_trains_the_global_stack():
    x = random_bits()
    for name, options in OPTIONS.items():
        model = make(**options).train()
        logits, _ = model(x)
        logits.square().mean().backward()
        grads = [p.grad for p in model.body.stack.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name


def test_save_then_load_gives_identical_logits(tmp_path):
    model = make(act=True)
    ckpt.save_pretrained(model, tmp_path / "m")
    loaded = ckpt.from_pretrained(tmp_path / "m").eval()
    x = random_bits()
    assert torch.equal(model(x)[0], loaded(x)[0])


def test_generate_returns_whole_bytes_with_valid_parity():
    out = generate(make(), "ab", 20, seed=0)
    assert len(out.new_bytes) == 20 and out.text.startswith("ab")


def test_patched_requires_the_bit_representation():
    with pytest.raises(ValueError, match="model.arch"):
        ModelConfig(arch="patched", representation="byte")


def test_presets_size_the_context_in_bytes_for_every_architecture():
    for name, n_bytes in (("tiny", 128), ("small", 256), ("base", 512)):
        assert ModelConfig.from_name(name).max_input_ids == 9 * n_bytes
        assert ModelConfig.from_name(name, arch="patched").max_input_ids == 9 * n_bytes
        assert ModelConfig.from_name(name, representation="byte").max_input_ids == n_bytes


def test_encoding_each_distinct_byte_once_gives_the_same_vectors_and_gradients():
    # 4 x 40 positions is above the size from which encode_bytes encodes distinct patterns once;
    # ids 0, 1 and MASK, and few distinct bytes, as in text
    body = make().body
    g = torch.Generator().manual_seed(3)
    bits = torch.randint(0, 3, (6, 9), generator=g)[torch.randint(0, 6, (4, 40), generator=g)]
    per_position = body._encode_patterns(bits)
    grads = torch.autograd.grad(per_position.square().sum(), list(body.byte_mlp.parameters()))
    once = body.encode_bytes(bits)
    torch.testing.assert_close(once, per_position)
    for a, b in zip(torch.autograd.grad(once.square().sum(), list(body.byte_mlp.parameters())), grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("parity", [True, False])
@pytest.mark.parametrize("with_prefix", [True, False])
def test_the_all_phase_readout_equals_reading_each_phase_alone(parity, with_prefix):
    # the training readout scores nodes with one matmul (and the parity phase apart); bit-by-bit
    # decoding reads one node at a time: the two must give the same logit for every bit
    body = make(parity=parity).body
    bpb = body.bits_per_byte
    g = torch.Generator().manual_seed(4)
    ctx = torch.randn(3, 7, body.node_vectors.embedding_dim, generator=g)
    bits = torch.randint(0, 2, (3, 7, bpb), generator=g)
    prefix = bits[..., :-1] if with_prefix else None
    together = body._local_logits(ctx, prefix, torch.arange(bpb))
    alone = [body._local_logits(ctx, None if prefix is None else prefix[..., :j], torch.tensor([j]))
             for j in range(bpb)]
    torch.testing.assert_close(together, torch.cat(alone, dim=-2))
