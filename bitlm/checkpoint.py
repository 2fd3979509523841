"""Checkpoints and pretrained directories: safetensors + JSON, written atomically, never unpickled.

Layout of a directory:
  config.json              {"format": "bitlm/1", "model": ModelConfig fields}
  model.safetensors        weights (and the reference marginals of S)
  optimizer.safetensors    optimizer tensors, keyed "state.<param index>.<name>"   (checkpoints only)
  optimizer.json           param groups and per-parameter scalar state             (checkpoints only)
  trainer_state.json       step, elapsed seconds, history, data position           (checkpoints only)
  rng.safetensors          torch generator states, so dropout continues exactly    (checkpoints only)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig, from_dict, to_dict

FORMAT = "bitlm/1"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temp dir next to `target`; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def _model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def _write_model(directory: Path, model) -> None:
    _write_json(directory / "config.json", {"format": FORMAT, "model": to_dict(model.config)})
    save_file(_model_state(model), str(directory / "model.safetensors"), metadata={"format": FORMAT})


def save_pretrained(model, directory: str | Path) -> Path:
    """Write config.json + model.safetensors atomically; returns the directory."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        _write_model(tmp, model)
    return directory


def read_config(directory: str | Path) -> ModelConfig:
    """The ModelConfig stored in a pretrained or checkpoint directory."""
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a bitlm model directory")
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: format {data.get('format')!r} is not {FORMAT!r}")
    return from_dict(ModelConfig, data["model"])


def from_pretrained(directory: str | Path, *, device: str | torch.device = "cpu"):
    """Load a model saved by save_pretrained (or any checkpoint directory)."""
    from .model import BitTransformerLM  # model imports codec/telemetry; keep this module light

    model = BitTransformerLM(read_config(directory))
    load_weights(model, directory)
    return model.to(device)


def load_weights(model, directory: str | Path) -> None:
    """Copy model.safetensors into an existing model; shapes and names must match exactly."""
    state = load_file(str(Path(directory) / "model.safetensors"))
    target = getattr(model, "_orig_mod", model)
    missing, unexpected = target.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{directory}: weights do not match the model (missing {missing}, unexpected {unexpected})")


def _optimizer_payload(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_checkpoint(directory: str | Path, model, optimizer: torch.optim.Optimizer, trainer_state: dict) -> Path:
    """Everything needed to resume training exactly, written atomically."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        _write_model(tmp, model)
        tensors, meta = _optimizer_payload(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        _write_json(tmp / "optimizer.json", meta)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        _write_json(tmp / "trainer_state.json", trainer_state)
    return directory


def load_checkpoint(directory: str | Path, model, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """Restore model (and optimizer, RNG) from a checkpoint; returns its trainer state."""
    directory = Path(directory)
    load_weights(model, directory)
    if optimizer is not None:
        tensors = load_file(str(directory / "optimizer.safetensors"))
        meta = json.loads((directory / "optimizer.json").read_text())
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
        for key, value in meta["scalars"].items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    rng = load_file(str(directory / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((directory / "trainer_state.json").read_text())


def step_directory(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint directories under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1] if found else None


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
