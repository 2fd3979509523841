"""INT8 and 4-bit quantization: closeness to fp32 (logits and held-out bpb), real 4-bit storage, save/load, QAT, CLI, serve.

Tolerances, and why:
- INT8: weights are int8 per output row (error <= half a step, max|w|/254) and activations are
  quantized per call to 7 bits (fbgemm's reduce_range), so each linear layer adds a relative error
  of about 1/127 of its input range. Over the tiny models' 2-layer stacks that is a few percent of
  the logit scale: we allow 5% of the fp32 logits' range, and 0.02 bits per byte on held-out text
  (a change 100x smaller than the gap between the byte baseline and gzip).
- 4-bit: a weight moves by up to half of its group's step (range/30), far more than INT8, so the
  closeness test is against what QAT trains: torchao's fake-quantized forward, which the packed
  kernel must reproduce up to bf16 rounding of activations (1% of the logit range; torchao's own
  conversion was seen within 0.3%). Held-out bpb of the QAT model may move by at most 0.1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bitlm.checkpoint import CheckpointError, from_pretrained, save_pretrained
from bitlm.config import ModelConfig, TrainConfig, from_dict, to_dict
from bitlm.data import Corpus
from bitlm.engine import fit
from bitlm.evaluation import evaluate_text
from bitlm.model import BitTransformerLM
from bitlm.quantization import Int4Linear, Int8Linear, quantize_dynamic, quantize_int4, storage_report
from bitlm.safety import safe_sample_with_retry
from bitlm.sampling import generate

pytest.importorskip("torchao")  # the 4-bit path: `pip install 'bitlm[quant]'` (part of dev)

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"
KINDS = ("flat", "patched", "byte")


def _model(kind: str) -> BitTransformerLM:
    torch.manual_seed(0)
    model = BitTransformerLM(ModelConfig.from_name("tiny", kind=kind)).eval()
    model.set_reference_marginals([0.4] * model.config.bits_per_byte)  # not the uniform default the gate warns of
    return model


def _ids(model, n_bytes: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    n = n_bytes * model.config.ids_per_byte
    return torch.randint(0, 256 if model.config.representation == "byte" else 2, (2, n), generator=g)


@pytest.fixture(scope="module")
def text() -> bytes:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not found (read from ../shared, never copied here)")
    return SHAKESPEARE.read_bytes()


@pytest.fixture(scope="module")
def qat_run(text):
    """A tiny patched model trained briefly with train.qat on tinyshakespeare, and a plain fp32 copy of it."""
    torch.manual_seed(0)
    model = BitTransformerLM(ModelConfig.from_name("tiny", kind="patched"))
    cfg = TrainConfig(max_steps=20, batch_size=8, context_bytes=64, warmup_steps=2, lr=1e-2, eval_every=1000,
                      log_every=1000, eval_batches=1, qat=True)
    fit(model, Corpus.from_bytes(text[:200_000], window_bytes=128, val_fraction=0.1), cfg)
    plain = BitTransformerLM(model.config)
    plain.load_state_dict(model.state_dict())  # the QAT layers keep the plain layers' names
    return model.eval(), plain.eval(), text[-4000:]  # the corpus' last bytes: never trained on


def _range(logits: torch.Tensor) -> float:
    return float(logits.detach().max() - logits.detach().min())


@pytest.mark.parametrize("kind", KINDS)
def test_int8_logits_stay_within_5_percent_of_the_fp32_range(kind):
    model = _model(kind)
    x = _ids(model)
    ref, out = model(x)[0], quantize_dynamic(model)(x)[0]
    assert (out - ref).abs().max() <= 0.05 * _range(ref)


def test_int8_and_int4_move_heldout_bpb_little_on_a_qat_trained_model(qat_run):
    model, plain, heldout = qat_run
    fp32 = evaluate_text(plain, heldout)["bpb"]
    fake_quantized = evaluate_text(model, heldout)["bpb"]
    int8 = evaluate_text(quantize_dynamic(plain), heldout)["bpb"]
    int4 = evaluate_text(quantize_int4(plain), heldout)["bpb"]
    assert fp32 < 7.0  # it learned something (uniform bits would score 9 per byte)
    assert abs(int8 - fp32) <= 0.02
    assert abs(int4 - fake_quantized) <= 0.1


def test_fit_with_qat_trains_through_fake_quantized_layers(qat_run):
    from torchao.quantization.qat.linear import Int4WeightOnlyQATLinear

    model, _, _ = qat_run
    assert isinstance(model.body.stack.blocks[0].attn.qkv, Int4WeightOnlyQATLinear)


def test_int4_kernel_reproduces_the_fake_quantized_training_forward(qat_run):
    model, plain, _ = qat_run
    x = _ids(plain)
    ref, out = model(x)[0], quantize_int4(plain)(x)[0]
    assert (out - ref).abs().max() <= 0.01 * _range(ref)


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_weights_are_stored_in_4_bits_plus_their_group_scales(group_size, tmp_path):
    model = _model("byte")
    quantized = quantize_int4(model, group_size=group_size)
    layers = [m for m in quantized.modules() if isinstance(m, Int4Linear)]
    assert layers and not any(isinstance(m, torch.nn.Linear) for m in quantized.modules())
    for layer in layers:
        assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (layer.out_features, layer.in_features // 2)
    report = storage_report(quantized)
    assert report["quantized_bits_per_weight"] <= 4 + 32 / group_size
    fp32 = save_pretrained(model, tmp_path / "fp32") / "model.safetensors"
    int4 = save_pretrained(quantized, tmp_path / "int4") / "model.safetensors"
    # the embeddings, norms and biases stay fp32; the linear weights shrink 32 / (4 + 32 / g) times
    linear = sum(m.in_features * m.out_features for m in layers)
    expected = fp32.stat().st_size - linear * 4 + linear * (4 + 32 / group_size) / 8
    assert int4.stat().st_size <= expected * 1.01
    assert int4.stat().st_size / fp32.stat().st_size < 0.3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_quantized_model_saves_and_loads_to_the_same_logits(kind, method, tmp_path):
    model = _model(kind)
    quantized = quantize_dynamic(model) if method == "int8" else quantize_int4(model)
    directory = save_pretrained(quantized, tmp_path / method)
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((directory / "config.json").read_text())["quantization"]["method"] == method
    loaded = from_pretrained(directory)
    x = _ids(model)
    assert torch.equal(loaded(x)[0], quantized(x)[0])


def test_a_model_directory_holding_a_pickle_is_refused_even_beside_safetensors(tmp_path):
    directory = save_pretrained(quantize_dynamic(_model("flat")), tmp_path / "m")
    (directory / "extra.ckpt").write_bytes(b"\x80\x04N.")
    with pytest.raises(CheckpointError, match=r"pickled weights \['extra.ckpt'\]"):
        from_pretrained(directory)


def test_a_quantized_model_refuses_a_gpu_device_with_one_line(tmp_path):
    directory = save_pretrained(quantize_int4(_model("byte")), tmp_path / "m")
    with pytest.raises(CheckpointError, match="runs on CPU only"):
        from_pretrained(directory, device="cuda")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_models_decode_with_the_kv_cache_like_the_full_recompute(kind, method):
    model = _model(kind)
    quantized = quantize_dynamic(model) if method == "int8" else quantize_int4(model)
    prompt = _ids(model, 6)[:1]
    state, logits = quantized.start_decoding(prompt)
    full = quantized(prompt, causal=True)[0][:, -1]
    assert torch.allclose(logits, full, atol=0.02 * _range(full) + 1e-4)
    out = generate(quantized, "To be", 3, seed=0)
    assert len(out.new_bytes) == 3


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_the_safety_gate_judges_quantized_samples(method):
    model = _model("patched")
    quantized = quantize_dynamic(model) if method == "int8" else quantize_int4(model)
    text, verdict = safe_sample_with_retry(quantized, "ab", 8, c_floor=0.0, s_floor=0.0, seed=1)
    assert text.startswith("ab") and verdict.passed


def test_the_torchao_int8_fallback_agrees_with_the_torch_kernel():
    model = _model("byte")
    x = _ids(model)
    torch_out = quantize_dynamic(model, backend="torch")(x)[0]
    torchao_out = quantize_dynamic(model, backend="torchao")(x)[0]
    assert (torch_out - torchao_out).abs().max() <= 0.05 * _range(torch_out)
    assert all(m.backend == "torchao" for m in quantize_dynamic(model, backend="torchao").modules()
               if isinstance(m, Int8Linear))


def test_train_qat_defaults_off_validates_its_group_size_and_old_configs_load():
    assert TrainConfig().qat is False and TrainConfig().qat_group_size == 32
    with pytest.raises(ValueError, match="train.qat_group_size"):
        TrainConfig(qat=True, qat_group_size=48)
    old = {k: v for k, v in to_dict(TrainConfig()).items() if not k.startswith("qat")}
    assert from_dict(TrainConfig, old) == TrainConfig()


def test_cli_quantize_and_eval_a_quantized_model(tmp_path, text):
    from bitlm.cli import main

    source = save_pretrained(_model("byte"), tmp_path / "fp32")
    runner = CliRunner()
    result = runner.invoke(main, ["quantize", str(source), "--int4", "--out", str(tmp_path / "int4")])
    assert result.exit_code == 0, result.output
    assert "bits per weight: quantized layers 5.000" in result.output and "bytes (0." in result.output
    sample = tmp_path / "heldout.txt"
    sample.write_bytes(text[-2000:])
    scored = runner.invoke(main, ["eval", str(tmp_path / "int4"), str(sample), "--json"])
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.output)["bpb"] > 0
    again = runner.invoke(main, ["quantize", str(tmp_path / "int4"), "--int8", "--out", str(tmp_path / "x")])
    assert again.exit_code == 2 and "already quantized (int4)" in again.output
    neither = runner.invoke(main, ["quantize", str(source), "--out", str(tmp_path / "y")])
    assert neither.exit_code == 2 and "choose --int8 or --int4" in neither.output


def test_serve_answers_generate_from_a_4bit_model(ray_local, tmp_path):
    import requests
    from ray import serve

    from serve.app import build_app
    from serve.local import free_port, wait_for

    directory = save_pretrained(quantize_int4(_model("patched")), tmp_path / "int4")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"model": str(directory), "allowed_roots": [str(tmp_path)], "num_cpus": 0.5,
                             "api_token": "serve-token-q", "audit_log": str(tmp_path / "audit.jsonl")}),
                  name="int4", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_for(f"{url}/healthz", 120)
        r = requests.post(f"{url}/v1/generate", json={"prompt": "To be", "max_new_bytes": 4, "seed": 0,
                                                      "temperature": 0.7, "c_floor": 0.0, "s_floor": 0.0},
                          headers={"Authorization": "Bearer serve-token-q"}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["text"] == generate(from_pretrained(directory), "To be", 4, seed=0, temperature=0.7).text
    finally:
        serve.shutdown()
