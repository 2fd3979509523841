"""CUDA behaviour the CPU suite cannot see: bf16 autocast training, KV-cache decoding, reversible RNG replay."""

from __future__ import annotations

import pytest
import torch

from bitlm.config import ModelConfig, TrainConfig
from bitlm.engine import autocast_factory, build_optimizer
from bitlm.model import BitTransformerLM
from bitlm.objective import batch_loss, model_inputs

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

KINDS = ("byte", "flat", "patched")
# TF32 matmuls keep a 10-bit mantissa: logits of a tiny model agree to about 1e-3 between paths
# that sum in different orders (the cache's one-position steps vs the full forward's matrices)
TF32_TOLERANCE = {"atol": 5e-3, "rtol": 5e-3}


def tiny_model(kind: str, device: str = "cuda", **overrides) -> BitTransformerLM:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", kind=kind, max_positions=256, **overrides)
    return BitTransformerLM(cfg).to(device)


def byte_batch(device: str = "cuda", batch: int = 4, length: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(32, 127, (batch, length), generator=g, dtype=torch.uint8).to(device)


@pytest.fixture(autouse=True)
def tf32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # what a user on a GPU gets from the benchmarks
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_autocast_step_gives_a_finite_loss_and_moves_every_trained_weight(kind):
    model = tiny_model(kind).train()
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with autocast_factory("bf16", torch.device("cuda"))():
        out = batch_loss(model, byte_batch())
    assert torch.isfinite(out.loss.float()), out.loss
    out.loss.backward()
    optimizer.step()
    moved = [n for n, p in model.named_parameters() if p.grad is not None and not torch.equal(p, before[n])]
    trained = [n for n, p in model.named_parameters() if p.grad is not None]
    assert trained and moved == trained


def decoded_logits(model: BitTransformerLM, ids: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """Logits of positions n_prefix - 1 .. T - 1 from the KV cache: a prefill, then one id at a time."""
    state, logits = model.start_decoding(ids[:, :n_prefix])
    steps = [logits]
    for t in range(n_prefix, ids.shape[1]):
        steps.append(model.decode_next(state, ids[:, t]))
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("kind", KINDS)
def test_cuda_kv_cache_decoding_equals_the_full_forward(kind):
    model = tiny_model(kind).eval()
    ids = model_inputs(model, byte_batch(batch=2, length=12))
    n_prefix = 3 * model.config.ids_per_byte + 1  # mid-byte for the bit models
    with torch.no_grad():
        full, _ = model(ids, causal=True)
        cached = decoded_logits(model, ids, n_prefix)
    torch.testing.assert_close(cached, full[:, n_prefix - 1:], **TF32_TOLERANCE)


def gradients(model: BitTransformerLM, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    logits, _ = model(x)
    (logits.float().square().mean() + logits[..., 1].mean()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def gradients_of_plain_autograd(model: BitTransformerLM, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same reversible coupling differentiated by autograd, which keeps activations instead of replaying."""
    stack = model.body.stack
    original = stack._reversible
    stack._reversible = lambda h, causal, per_layer: stack._coupled_inference(h, causal, None, False)
    try:
        return gradients(model, x)
    finally:
        stack._reversible = original


def test_reversible_backward_replays_cuda_dropout_masks():
    model = tiny_model("flat", reversible=True, dropout=0.1, n_layers=3).train()
    x = torch.randint(0, 2, (2, 72), generator=torch.Generator().manual_seed(1)).cuda()
    torch.manual_seed(123)  # seeds the CUDA generator too: both runs draw the same dropout masks
    replayed = gradients(model, x)
    torch.manual_seed(123)
    reference = gradients_of_plain_autograd(model, x)
    torch.manual_seed(124)
    other_masks = gradients_of_plain_autograd(model, x)
    assert replayed.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(replayed[name], reference[name], **TF32_TOLERANCE, msg=name)
    # the comparison can fail: other dropout masks give other gradients
    assert any(not torch.allclose(other_masks[n], reference[n], **TF32_TOLERANCE) for n in reference)
