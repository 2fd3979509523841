"""Byte-at-once sampling of the patched model: the tree's joint equals the bit-by-bit product, and draws follow it."""

import dataclasses

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from bitlm.config import ModelConfig
from bitlm.model import BitTransformerLM
from bitlm.sampling import generate, generate_ids, resolve_sampling_unit

PATCHED = ModelConfig.from_name("tiny", arch="patched", max_positions=16)


def make(**overrides):
    torch.manual_seed(0)
    model = BitTransformerLM(dataclasses.replace(PATCHED, **overrides)).eval()
    with torch.no_grad():  # sharpen the tree so the joint is far from uniform and a wrong path would show
        model.body.node_vectors.weight.mul_(8.0)
        model.body.node_bias.weight.normal_(0.0, 1.5)
    return model


def prompt_bits(model, batch: int = 1, n_bytes: int = 3) -> torch.Tensor:
    return torch.randint(0, 2, (batch, n_bytes * model.config.bits_per_byte), generator=torch.Generator().manual_seed(3))


def bitwise_joint(model, prompt: torch.Tensor) -> torch.Tensor:
    """log p of every pattern (2^bpb,) as the product of decode_next's conditionals, one row per pattern."""
    bpb = model.config.bits_per_byte
    patterns = model.body.pattern_bits  # (2^bpb, bpb)
    state, logits = model.start_decoding(prompt.expand(patterns.shape[0], -1))
    total = torch.zeros(patterns.shape[0], dtype=torch.float64)
    for j in range(bpb):
        log_probs = logits.double().log_softmax(-1)
        total += log_probs.gather(1, patterns[:, j:j + 1])[:, 0]
        if j < bpb - 1:
            logits = model.decode_next(state, patterns[:, j])
    return total


@pytest.mark.parametrize("parity", [True, False])
def test_tree_joint_equals_the_product_of_bit_conditionals(parity):
    model = make(parity=parity)
    prompt = prompt_bits(model)
    state, _ = model.start_decoding(prompt)
    joint = model.body.next_byte_log_probs(state)[0].double()
    assert joint.shape == (2 ** model.config.bits_per_byte,)
    assert torch.allclose(joint.exp().sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(joint.exp(), bitwise_joint(model, prompt).exp(), atol=1e-5, rtol=0)
    assert joint.exp().max() > 4 / joint.numel()  # the test model is far from uniform


def test_pattern_index_is_the_bits_msb_first():
    model = make()
    bits = model.body.pattern_bits
    weights = 2 ** torch.arange(model.config.bits_per_byte - 1, -1, -1)
    assert torch.equal((bits * weights).sum(-1), torch.arange(bits.shape[0]))


@pytest.mark.parametrize("unit", ["byte", "bit"])
def test_one_step_draws_follow_the_exact_joint(unit):
    model = make(parity=False)  # 256 patterns keep the expected counts per cell large
    prompt = prompt_bits(model)
    n = 20000
    out = generate_ids(model, prompt.expand(n, -1), 8, seed=12345, sampling_unit=unit)[:, prompt.shape[1]:]
    index = (out * 2 ** torch.arange(7, -1, -1)).sum(-1)
    observed = np.bincount(index.numpy(), minlength=256)
    expected = bitwise_joint(model, prompt).exp().numpy() * n
    common = expected >= 5  # pool the rare patterns into one cell, as a chi-square test needs
    f_obs = np.append(observed[common], observed[~common].sum())
    f_exp = np.append(expected[common], expected[~common].sum())
    _, p_value = chisquare(f_obs, f_exp * f_obs.sum() / f_exp.sum())
    assert p_value > 1e-4  # fixed seed: deterministic; a wrong distribution gives p ~ 0 at n = 20000


def test_push_byte_equals_feeding_the_bits_through_decode_next():
    model = make()
    prompt = prompt_bits(model, batch=2)
    byte = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 0, 0], [0, 1, 1, 1, 1, 0, 0, 0, 1]])
    by_bits, _ = model.start_decoding(prompt)
    for j in range(9):
        model.decode_next(by_bits, byte[:, j])
    at_once, _ = model.start_decoding(prompt)
    model.body.push_byte(at_once, byte)
    assert torch.allclose(model.body.next_byte_log_probs(by_bits), model.body.next_byte_log_probs(at_once), atol=1e-6)


def test_byte_sampling_runs_past_the_context_and_matches_a_fresh_greedy_decode():
    model = make()
    prompt = prompt_bits(model)
    out = generate_ids(model, prompt, 9 * 30, temperature=0)  # 33 bytes > max_positions of 16
    assert out.shape == (1, prompt.shape[1] + 9 * 30)
    assert torch.equal(out[:, :prompt.shape[1]], prompt)
    # the first byte is the argmax of the joint
    state, _ = model.start_decoding(prompt)
    best = model.body.next_byte_log_probs(state).argmax(-1)
    assert torch.equal(out[:, prompt.shape[1]:prompt.shape[1] + 9], model.body.pattern_bits[best])


def test_row_seeds_give_a_row_the_same_bytes_alone_or_batched():
    model = make()
    prompt = prompt_bits(model, batch=2)
    batched = generate_ids(model, prompt, 45, row_seeds=[5, 6])
    alone = generate_ids(model, prompt[1:], 45, row_seeds=[6])
    assert torch.equal(batched[1:], alone)


def test_top_k_one_at_byte_level_is_greedy_over_bytes():
    model = make()
    prompt = prompt_bits(model)
    assert torch.equal(generate_ids(model, prompt, 27, top_k=1, seed=0), generate_ids(model, prompt, 27, temperature=0))


def test_generate_defaults_to_bytes_for_patched_models():
    model = make()
    assert resolve_sampling_unit(model.config, None) == "byte"
    assert generate(model, "ab", 6, seed=1).new_bytes == generate(model, "ab", 6, seed=1, sampling_unit="byte").new_bytes
    assert len(generate(model, "ab", 6, seed=1, sampling_unit="bit").new_bytes) == 6


def test_impossible_units_raise_clear_errors():
    flat = ModelConfig.from_name("tiny")
    byte = ModelConfig.from_name("tiny", representation="byte")
    with pytest.raises(ValueError, match="patched"):
        resolve_sampling_unit(flat, "byte")
    with pytest.raises(ValueError, match="byte baseline"):
        resolve_sampling_unit(byte, "bit")
    with pytest.raises(ValueError, match="'bit' or 'byte'"):
        resolve_sampling_unit(flat, "word")
    assert resolve_sampling_unit(flat, None) == "bit" and resolve_sampling_unit(byte, None) == "byte"


def test_byte_sampling_needs_whole_bytes():
    model = make()
    with pytest.raises(ValueError, match="whole bytes"):
        generate_ids(model, torch.zeros(1, 10, dtype=torch.long), 9, sampling_unit="byte")
    with pytest.raises(ValueError, match="whole bytes"):
        generate_ids(model, torch.zeros(1, 9, dtype=torch.long), 5, sampling_unit="byte")
    with pytest.raises(ValueError, match="use_cache"):
        generate_ids(model, torch.zeros(1, 9, dtype=torch.long), 9, sampling_unit="byte", use_cache=False)
