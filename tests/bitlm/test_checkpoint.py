"""Checkpoints and pretrained directories: exact round trips, atomic writes, no pickle."""

import dataclasses
import json

import pytest
import torch

from bitlm import checkpoint as ckpt
from bitlm.config import ModelConfig
from bitlm.model import BitTransformerLM

CFG = ModelConfig.from_name("tiny", max_positions=64, act=True)


def model_and_input(seed=0):
    torch.manual_seed(seed)
    model = BitTransformerLM(CFG).eval()
    model.set_reference_marginals(torch.linspace(0.1, 0.9, 9))
    return model, torch.randint(0, 2, (2, 45))


def test_save_then_load_gives_identical_logits_and_telemetry(tmp_path):
    model, x = model_and_input()
    ckpt.save_pretrained(model, tmp_path / "m")
    loaded = ckpt.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == model.config
    a, tel_a = model(x, return_telemetry=True)
    b, tel_b = loaded(x, return_telemetry=True)
    assert torch.equal(a, b)
    assert torch.equal(tel_a["symbiosis"], tel_b["symbiosis"])


def test_pretrained_directory_holds_only_json_and_safetensors(tmp_path):
    model, _ = model_and_input()
    ckpt.save_pretrained(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    data = json.loads((tmp_path / "m" / "config.json").read_text())
    assert data["format"] == "bitlm/1" and data["model"]["act"] is True


def test_checkpoint_round_trip_restores_optimizer_state(tmp_path):
    model, x = model_and_input()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(x)[0].sum().backward()
    opt.step()
    ckpt.save_checkpoint(tmp_path / "c", model, opt, {"step": 1})
    fresh, _ = model_and_input(seed=5)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    state = ckpt.load_checkpoint(tmp_path / "c", fresh, fresh_opt)
    assert state == {"step": 1}
    saved, restored = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert saved.keys() == restored.keys()
    for index, entries in saved.items():
        for name, value in entries.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(restored[index][name])), (index, name)


def test_a_failed_write_leaves_the_previous_directory_intact(tmp_path):
    model, _ = model_and_input()
    target = ckpt.save_pretrained(model, tmp_path / "m")
    before = (target / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError):
        with ckpt.atomic_directory(target) as tmp:
            (tmp / "config.json").write_text("partial")
            raise RuntimeError("disk full")
    assert (target / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp directories left behind


def test_loading_into_a_different_shape_fails_clearly(tmp_path):
    model, _ = model_and_input()
    ckpt.save_pretrained(model, tmp_path / "m")
    other = BitTransformerLM(dataclasses.replace(CFG, act=False))
    with pytest.raises(ValueError, match="do not match"):
        ckpt.load_weights(other, tmp_path / "m")


def test_a_directory_without_config_is_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a bitlm model directory"):
        ckpt.from_pretrained(tmp_path)


def test_a_safetensors_header_length_with_low_byte_0x80_is_not_taken_for_a_pickle(tmp_path):
    # one header length in 256 starts the file with 0x80, a pickle's first byte; such a file once
    # made a valid model unloadable
    import pickle

    from safetensors.torch import save_file

    model, x = model_and_input()
    directory = ckpt.save_pretrained(model, tmp_path / "m")
    weights = directory / "model.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    for pad in range(512):
        save_file(state, str(weights), metadata={"format": ckpt.FORMAT, "pad": " " * pad})
        if weights.read_bytes()[:1] == b"\x80":
            break
    assert weights.read_bytes()[:1] == b"\x80"
    loaded = ckpt.from_pretrained(directory)
    assert torch.equal(loaded(x)[0], model(x)[0])
    weights.write_bytes(pickle.dumps({"w": 1}))  # a real pickle is still refused
    with pytest.raises(ckpt.CheckpointError, match="pickle"):
        ckpt.from_pretrained(directory)
