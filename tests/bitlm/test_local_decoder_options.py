"""The patched model's encoder and local-decoder options: model.tree_shared_bits (tree nodes that
share per-(phase, earlier bit) vectors across bytes), model.local_d_ff=0 (the nodes read the global
state), model.byte_table (a learned vector per whole byte pattern in the encoder) and
model.byte_softmax (the bits' conditionals read from one softmax over the byte's patterns) and
model.known_parity (that softmax over the data patterns only, the parity bit's logit fixed)."""

import copy
import dataclasses

import pytest
import torch

from decoding_checks import assert_incremental_decoding_equals_full_forward

from bitlm.checkpoint import from_pretrained, save_pretrained
from bitlm.config import ModelConfig, TrainConfig
from bitlm.model import BitTransformerLM
from bitlm.objective import batch_loss
from bitlm.optim import build_optimizer
from bitlm.pipelining import prune_to_stage

CFG = ModelConfig.from_name("tiny", kind="patched", max_positions=16, tree_shared_bits=True)
OPTIONS = {"shared": {}, "no_projection": {"tree_shared_bits": False, "local_d_ff": 0},
           "table": {"tree_shared_bits": False, "byte_table": True},
           "all": {"local_d_ff": 0, "byte_table": True}, "no_projection_local_mlp": {"local_d_ff": 0, "n_local_layers": 1},
           "softmax": {"tree_shared_bits": False, "byte_softmax": True}, "softmax_shared": {"byte_softmax": True},
           "softmax_no_projection_table": {"tree_shared_bits": False, "byte_softmax": True, "local_d_ff": 0,
                                           "byte_table": True},
           "softmax_known_parity": {"tree_shared_bits": False, "byte_softmax": True, "known_parity": True},
           "softmax_known_parity_shared_table": {"byte_softmax": True, "known_parity": True, "local_d_ff": 0,
                                                 "byte_table": True}}


def make(seed=0, trained=True, **changes) -> BitTransformerLM:
    """A shared-bits patched model; trained=True moves every weight (the shared ones start at 0) off its init."""
    torch.manual_seed(seed)
    model = BitTransformerLM(dataclasses.replace(CFG, **changes)).eval()
    if trained:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model


def random_bits(n_bytes=10, batch=2, seed=1, bpb=9):
    return torch.randint(0, 2, (batch, n_bytes * bpb), generator=torch.Generator().manual_seed(seed))


def test_a_nodes_vector_adds_the_shared_vector_of_each_earlier_bit_of_its_prefix():
    body = make().body
    vectors, bias = body.node_table()
    shared = body.shared_vectors.view(9, 9, 2, -1)  # (phase j, earlier phase m, value of bit m)
    shared_bias = body.shared_bias.view(9, 9, 2)
    for j, p in [(0, 0), (3, 0b101), (8, 0b10110011)]:
        node = 2 ** j - 1 + p
        bits = [(p >> (j - 1 - m)) & 1 for m in range(j)]  # MSB first
        expected = body.node_vectors.weight[node] + sum((shared[j, m, b] for m, b in enumerate(bits)),
                                                        torch.zeros_like(vectors[0]))
        torch.testing.assert_close(vectors[node], expected)
        torch.testing.assert_close(bias[node], body.node_bias.weight[node, 0]
                                   + sum((shared_bias[j, m, b] for m, b in enumerate(bits)), torch.tensor(0.0)))
    # the per-phase nodes of non-causal mode have no prefix, so nothing is shared
    torch.testing.assert_close(vectors[511:], body.node_vectors.weight[511:])


def test_an_untrained_model_is_the_plain_tree_and_encoder():
    x = random_bits()
    shared, plain = make(trained=False, byte_table=True), make(trained=False, tree_shared_bits=False)
    torch.testing.assert_close(shared(x, causal=True)[0], plain(x, causal=True)[0])


def test_the_byte_table_adds_one_vector_per_whole_pattern_and_none_to_masked_bytes():
    body = make(byte_table=True).body
    bits = torch.tensor([[[0, 1, 1, 0, 0, 0, 0, 1, 1], [0, 1, 1, 0, 0, 0, 0, 1, 1], [0, 1, 2, 0, 0, 0, 0, 1, 1]]])
    table_off = make(byte_table=True).body
    with torch.no_grad():
        table_off.byte_table.zero_()
    encoded, plain = body.encode_bytes(bits), table_off.encode_bytes(bits)
    torch.testing.assert_close(encoded[0, 0] - plain[0, 0], body.byte_table[0b011000011])
    torch.testing.assert_close(encoded[0, 1], encoded[0, 0])
    torch.testing.assert_close(encoded[0, 2], plain[0, 2])  # a masked bit: no pattern, no table vector


@pytest.mark.parametrize("option", OPTIONS)
def test_flipping_bit_t_never_changes_the_logits_of_bits_up_to_t(option):
    model = make(**OPTIONS[option])
    x = random_bits()
    base = model(x, causal=True)[0]
    for t in (0, 4, 8, 9, 40, 89):
        flipped = x.clone()
        flipped[:, t] ^= 1
        torch.testing.assert_close(model(flipped, causal=True)[0][:, :t], base[:, :t])


@pytest.mark.parametrize("option", OPTIONS)
def test_bit_by_bit_and_byte_at_once_decoding_equal_the_full_forward(option):
    model = make(**OPTIONS[option])
    x = random_bits(n_bytes=12)
    assert_incremental_decoding_equals_full_forward(model, x)
    full, _ = model(x)
    # the joint of the byte after 3 whole bytes, read from the full forward's 9 conditionals
    state, _ = model.start_decoding(x[:, :27])
    joint = model.body.next_byte_log_probs(state)  # (2, 512), index = bits MSB first
    byte = x[:, 27:36]
    index = (byte * 2 ** torch.arange(8, -1, -1)).sum(-1)
    expected = full[:, 26:35].float().log_softmax(-1).gather(-1, byte[..., None])[..., 0].sum(-1)
    torch.testing.assert_close(joint.gather(1, index[:, None])[:, 0], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("option", OPTIONS)
def test_save_then_load_gives_identical_logits_and_old_configs_build_no_shared_tensors(option, tmp_path):
    model = make(**OPTIONS[option])
    x = random_bits()
    save_pretrained(model, tmp_path / "m")
    torch.testing.assert_close(from_pretrained(tmp_path / "m")(x, causal=True)[0], model(x, causal=True)[0])
    plain = make(tree_shared_bits=False)
    assert not any("shared" in name for name in plain.state_dict())


@pytest.mark.parametrize("option", OPTIONS)
def test_two_pipeline_stages_compute_the_full_models_logits(option):
    model = make(**OPTIONS[option])
    first, last = copy.deepcopy(model), copy.deepcopy(model)
    prune_to_stage(first, range(0, 1), is_first=True, is_last=False)
    prune_to_stage(last, range(1, 2), is_first=False, is_last=True)
    x = random_bits()
    hidden = first(x, causal=True, readout=False)[0]
    logits = last.readout(last(hidden, causal=True, readout=False)[0], x)
    torch.testing.assert_close(logits, model(x)[0], atol=1e-5, rtol=1e-4)
    names = [n for stage in (first, last) for n, _ in stage.named_parameters()]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # the shared tensors live in the last


@pytest.mark.parametrize("changes", [{}, {"byte_softmax": True, "known_parity": True}], ids=["tree", "known_parity"])
def test_training_moves_the_shared_vectors_and_lowers_the_loss(changes):
    torch.manual_seed(0)
    model = BitTransformerLM(dataclasses.replace(CFG, **changes)).train()
    opt = build_optimizer(model, TrainConfig(lr=3e-3))
    batch = torch.tensor([list(b"To be, or not to be: that is") [:16]] * 4, dtype=torch.uint8)
    losses = []
    for _ in range(30):
        out = batch_loss(model, batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss.detach()))
    assert model.body.shared_vectors.abs().sum() > 0
    assert losses[-1] < 0.5 * losses[0]


def test_without_the_projection_the_nodes_read_the_normed_global_state():
    model = make(local_d_ff=0)
    body = model.body
    assert len(body.to_local) == 0 and body.node_vectors.embedding_dim == model.config.d_model
    x = random_bits()
    features = body(x, causal=True, readout=False)[0]
    hidden = body.stack(body.embed_bits(x, causal=True, offset=None), causal=True).hidden
    torch.testing.assert_close(features, body.norm(hidden))


def test_zero_init_head_without_the_projection_starts_every_node_at_its_bias():
    model = make(trained=False, local_d_ff=0, zero_init_head=True)
    assert not model.body.node_vectors.weight.any()
    logits = model(random_bits(), causal=True)[0]
    assert torch.equal(logits[..., 0], torch.zeros_like(logits[..., 0]))


def test_byte_softmax_bits_are_the_conditionals_of_one_softmax_over_patterns():
    model = make(tree_shared_bits=False, byte_softmax=True)
    body = model.body
    x = random_bits(n_bytes=4, batch=3)
    ctx = body(x, causal=True, readout=False)[0]  # (3, 5, hidden): BOS + 4 bytes
    joint = (ctx @ body.pattern_vectors.weight.T + body.pattern_bias.weight[:, 0]).log_softmax(-1)  # (3, 5, 512)
    log_probs = model(x, causal=True)[0].float().log_softmax(-1)  # logits[:, t] predicts bit t + 1
    bits = x.view(3, 4, 9)
    # the sum of a byte's 9 bit log-probabilities is its pattern's log-probability under the joint
    for i in range(1, 4):  # byte i, predicted from state i (bits 9 i .. 9 i + 8, logits 9 i - 1 ..)
        index = int((bits[0, i] * 2 ** torch.arange(8, -1, -1)).sum())
        per_bit = log_probs[0, 9 * i - 1:9 * i + 8].gather(-1, bits[0, i, :, None])[:, 0].sum()
        torch.testing.assert_close(per_bit, joint[0, i, index], atol=1e-5, rtol=1e-5)
    # a prefix's bit conditional is the ratio of the masses of the patterns that continue it
    prefix = bits[1, 2, :4]
    starts = (torch.arange(512)[:, None] >> torch.arange(8, -1, -1) & 1)[:, :4].eq(prefix).all(-1)
    with_one = starts & (torch.arange(512) >> 4 & 1).bool()
    expected = joint[1, 2][with_one].logsumexp(0) - joint[1, 2][starts].logsumexp(0)
    torch.testing.assert_close(log_probs[1, 9 * 2 + 3, 1], expected, atol=1e-5, rtol=1e-5)


def test_byte_softmax_is_for_causal_models():
    noncausal = make(tree_shared_bits=False, byte_softmax=True, causal=False).body
    assert noncausal.pattern_vectors is None and noncausal.node_vectors is not None  # diffusion keeps the tree
    assert make(tree_shared_bits=False, byte_softmax=True).body.node_vectors is None


def test_with_byte_softmax_each_pattern_adds_the_shared_vector_of_each_of_its_bits():
    body = make(byte_softmax=True).body
    vectors, bias = body.node_table()
    shared, shared_bias = body.shared_vectors.view(9, 2, -1), body.shared_bias.view(9, 2)
    for v in (0, 0b011000011, 511):
        bits = [(v >> (8 - m)) & 1 for m in range(9)]
        torch.testing.assert_close(vectors[v], body.pattern_vectors.weight[v]
                                   + sum(shared[m, b] for m, b in enumerate(bits)))
        torch.testing.assert_close(bias[v], body.pattern_bias.weight[v, 0]
                                   + sum(shared_bias[m, b] for m, b in enumerate(bits)))


def test_tree_masses_of_a_joint_match_logsumexp_even_for_extreme_logits():
    from bitlm.pattern_joint import log_ratio as _log_ratio, tree_masses as _tree_masses

    logits = torch.randn(3, 512, dtype=torch.float64) * 4
    logits[1, :256] -= 200.0  # a half of the tree beyond float32's range: clamped, never inf or nan
    scores = _log_ratio(_tree_masses(logits))  # (3, 511)
    assert torch.isfinite(scores).all()
    for j, p in [(0, 0), (4, 0b1011), (8, 0b11100101)]:
        width = 2 ** (9 - j - 1)  # patterns below each child of node (j, p)
        start = (2 * p) * width
        expected = logits[0, start + width:start + 2 * width].logsumexp(0) - logits[0, start:start + width].logsumexp(0)
        torch.testing.assert_close(scores[0, 2 ** j - 1 + p].double(), expected, atol=1e-4, rtol=1e-4)
    assert 80 < scores[1, 0] < 90  # the clamped side of the root: a large, finite score for bit 0 = 1


def test_a_diffusion_model_trains_with_the_tuned_recipes_patched_options():
    from bitlm.diffusion import diffusion_batch_loss, diffusion_sample

    # byte_softmax and known_parity are ignored there (a non-causal model keeps its tree); the other three act
    model = make(trained=False, causal=False, local_d_ff=0, byte_table=True, byte_softmax=True,
                 known_parity=True).train()
    opt = build_optimizer(model, TrainConfig(lr=3e-3))
    batch = torch.tensor([list(b"To be, or not to be: that is")[:16]] * 4, dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(20):
        out = diffusion_batch_loss(model, batch, schedule="linear", generator=generator)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss.detach()))
    assert model.body.shared_vectors.abs().sum() > 0 and model.body.byte_table.abs().sum() > 0
    assert losses[-1] < losses[0]
    assert len(diffusion_sample(model.eval(), "To be", 8, steps=4, seed=0).new_bytes) == 8


def test_known_parity_scores_the_data_patterns_and_makes_the_parity_bit_certain():
    from bitlm.codec import bytes_to_bit_tensor

    model = make(tree_shared_bits=False, byte_softmax=True, known_parity=True)
    body = model.body
    assert body.pattern_vectors.num_embeddings == 256  # the byte model's head width
    x = bytes_to_bit_tensor(torch.tensor([list(b"Parity!"), list(b"\x00\xff\x80ab~\x7f")], dtype=torch.uint8))
    ctx = body(x, causal=True, readout=False)[0]
    joint = (ctx @ body.pattern_vectors.weight.T + body.pattern_bias.weight[:, 0]).log_softmax(-1)  # (2, 8, 256)
    log_probs = model(x, causal=True)[0].float().log_softmax(-1)
    bits = x.view(2, 7, 9)
    for row in range(2):
        for i in range(1, 7):
            data = int((bits[row, i, :8] * 2 ** torch.arange(7, -1, -1)).sum())
            per_bit = log_probs[row, 9 * i - 1:9 * i + 8].gather(-1, bits[row, i, :, None])[:, 0]
            # the 8 data bits multiply to the 256-way softmax; the (right) parity bit costs nothing
            torch.testing.assert_close(per_bit[:8].sum(), joint[row, i, data], atol=1e-5, rtol=1e-5)
            assert per_bit[8] > -1e-6
    # a wrong parity bit is possible but costs 30 nats, finite
    wrong = x.clone()
    wrong[0, 9 * 3 + 8] ^= 1
    cost = -model(wrong, causal=True)[0].float().log_softmax(-1)[0, 9 * 3 + 7, int(wrong[0, 9 * 3 + 8])]
    torch.testing.assert_close(cost, torch.tensor(30.0), atol=1e-3, rtol=0)


def test_known_parity_acts_only_with_the_byte_softmax_of_a_causal_model_with_parity_bits():
    assert make(known_parity=True).body.pattern_vectors is None  # the tree: nothing changes
    noncausal = make(byte_softmax=True, known_parity=True, causal=False).body
    assert noncausal.pattern_vectors is None and noncausal.joint_bits == 9 and noncausal.parity_scores is None
    no_parity = make(byte_softmax=True, known_parity=True, parity=False).body
    assert no_parity.pattern_vectors.num_embeddings == 256 and no_parity.parity_scores is None
    x = random_bits(bpb=8)
    torch.testing.assert_close(make(byte_softmax=True, known_parity=True, parity=False)(x, causal=True)[0],
                               make(byte_softmax=True, parity=False)(x, causal=True)[0])


@pytest.mark.parametrize("option", ["shared", "softmax_known_parity_shared_table"])
def test_every_partial_last_byte_gives_the_prefix_of_the_whole_window_logits(option):
    model = make(**OPTIONS[option])
    x = random_bits(n_bytes=3)
    whole, _ = model(x)
    for n_bits in range(1, x.shape[1]):  # from less than one byte: then the stack reads BOS alone
        torch.testing.assert_close(model(x[:, :n_bits])[0], whole[:, :n_bits], atol=1e-6, rtol=0)


@pytest.mark.parametrize("option", ["no_projection", "softmax_known_parity_shared_table"])
def test_the_training_loss_runs_the_stack_over_bos_and_all_but_the_last_byte_with_the_same_loss(option):
    """batch_loss gives the model the window without its last bit (bitlm.objective.scored_inputs): the last
    byte leaves the stack (L positions, not L + 1), and the loss and every gradient stay those of the whole window."""
    from bitlm.objective import causal_loss, model_inputs

    batch = torch.tensor([list(b"To be, or not to")] * 3, dtype=torch.uint8)  # 16 bytes
    whole, trimmed = make(**OPTIONS[option]).train(), make(**OPTIONS[option]).train()
    ids = model_inputs(whole, batch)
    reference = causal_loss(whole(ids, causal=True)[0], ids, whole.config)
    reference.loss.backward()
    positions = []
    trimmed.body.stack.register_forward_hook(lambda module, args, output: positions.append(args[0].shape[1]))
    out = batch_loss(trimmed, batch)
    out.loss.backward()
    assert positions == [16]  # BOS + bytes 0..14
    torch.testing.assert_close(out.loss, reference.loss, atol=1e-6, rtol=0)
    assert out.n_bytes == reference.n_bytes
    torch.testing.assert_close(out.nll_bits, reference.nll_bits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.p_one, reference.p_one, atol=1e-6, rtol=0)
    for (name, p), q in zip(trimmed.named_parameters(), whole.parameters()):
        if q.grad is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)
