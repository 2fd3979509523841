"""Checkpoints and pretrained directories: safetensors + JSON, written atomically, never unpickled.

Layout of a directory:
  config.json              {"format": "bitlm/1", "model": ModelConfig fields}
  model.safetensors        weights (and the reference marginals of S)
  optimizer.safetensors    optimizer tensors, keyed "state/<parameter name>/<field>" (checkpoints only)
  optimizer.json           param groups (by parameter name) and scalar state       (checkpoints only)
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ModelConfig, from_dict, to_dict
from .parallel import cpu_state, load_named_optimizer_state, named_optimizer_state

FORMAT = "bitlm/1"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_CHECKPOINT_DIR = re.compile(r"^(step-\d{8}|checkpoint_\d+)$")  # train --local's, Ray Train's
WEIGHTS = "model.safetensors"
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class CheckpointError(ValueError):
    """A model or checkpoint directory that cannot be loaded or resumed; the message names the path and the fault."""


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


def _write_model(directory: Path, config: ModelConfig, state: dict[str, torch.Tensor]) -> None:
    _write_json(directory / "config.json", {"format": FORMAT, "model": to_dict(config)})
    save_file(state, str(directory / "model.safetensors"), metadata={"format": FORMAT})


def save_pretrained(model, directory: str | Path) -> Path:
    """Write config.json + model.safetensors atomically; returns the directory."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        _write_model(tmp, model.config, cpu_state(model))
    return directory


def read_config(directory: str | Path) -> ModelConfig:
    """The ModelConfig stored in a pretrained or checkpoint directory.

    FileNotFoundError when it has no config.json; CheckpointError, naming the file, when that cannot be used.
    """
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a bitlm model directory")
    try:
        data = json.loads(path.read_bytes())
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror or err})") from None
    except ValueError as err:  # malformed JSON, or bytes that are not UTF-8
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(data).__name__}, not a bitlm model config")
    if data.get("format") != FORMAT:
        run = " (a training run's config, not a model's; the run has no model/ or checkpoint yet)" \
            if "train" in data else ""
        raise CheckpointError(f"{path}: format {data.get('format')!r} is not {FORMAT!r}{run}")
    if not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{path}: 'model' must be an object of ModelConfig fields")
    try:
        return from_dict(ModelConfig, data["model"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from None


def resolve_pretrained(path: str | Path) -> Path:
    """The model directory `path` names: itself, or in a run directory its model/, else its newest checkpoint.

    Run directories are `bitlm train` output (model/, checkpoints/step-N), Ray Train runs
    (checkpoint_N) and downloaded MLflow pyfunc models (artifacts/model).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory" if path.exists() else f"{path}: no such directory")
    if (path / WEIGHTS).exists():
        return path
    for sub in (path / "model", path / "artifacts" / "model"):
        if (sub / "config.json").is_file():
            return sub
    for root in (path, path / "checkpoints"):
        found = [p for p in root.iterdir() if p.is_dir() and _CHECKPOINT_DIR.match(p.name)] if root.is_dir() else []
        if found:
            return max(found, key=lambda p: int(re.sub(r"\D", "", p.name)))
    return path  # validate_pretrained says what it lacks


def validate_pretrained(directory: str | Path) -> ModelConfig:
    """Check a model directory without loading its weights; returns its ModelConfig.

    config.json must parse, and model.safetensors must be a complete safetensors file whose tensor
    names and shapes are those of the model the config describes (read from its header). Raises
    CheckpointError naming the file and what is wrong with it.
    """
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise CheckpointError(f"{directory}: no config.json: not a bitlm model directory "
                              "(nor a run directory with model/ or checkpoints)")
    config = read_config(directory)
    check_weights(directory, config)
    return config


def check_weights(directory: str | Path, config: ModelConfig) -> None:
    """CheckpointError unless directory/model.safetensors holds exactly the tensors of `config`'s model."""
    directory = Path(directory)
    path = directory / WEIGHTS
    if not path.is_file():
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLED_SUFFIXES)
        if pickled:
            raise CheckpointError(f"{directory}: holds pickled weights {pickled}; only {WEIGHTS} is loaded "
                                  "(pickles can run code): convert with bitlm's save_pretrained")
        raise CheckpointError(f"{path}: not a file" if path.exists() else f"{path}: not found")
    found = _tensor_shapes(path)
    expected = _model_shapes(config, directory / "config.json")
    faults = []
    if missing := sorted(set(expected) - set(found)):
        faults.append(f"missing {_some(missing)}")
    if unexpected := sorted(set(found) - set(expected)):
        faults.append(f"unexpected {_some(unexpected)}")
    if wrong := [f"{k} {found[k]} (not {expected[k]})" for k in sorted(set(found) & set(expected))
                 if found[k] != expected[k]]:
        faults.append(f"shapes {_some(wrong)}")
    if faults:
        raise CheckpointError(f"{path}: does not match the model in config.json ({'; '.join(faults)})")


def _some(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor names and shapes from a safetensors header (the tensors themselves are not read)."""
    try:
        with path.open("rb") as f:
            magic = f.read(4)
        if magic[:2] == b"PK" or magic[:1] == b"\x80":  # torch.save's zip archive, or a bare pickle
            raise CheckpointError(f"{path}: a pickle (torch.save) file, not safetensors; pickles can run code "
                                  "and are never loaded")
        with safe_open(str(path), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror or err})") from None
    except SafetensorError as err:
        raise CheckpointError(f"{path}: truncated or not a safetensors file ({path.stat().st_size} bytes; "
                              f"{str(err).removeprefix('Error while deserializing header: ')})") from None


def _model_shapes(config: ModelConfig, source: Path) -> dict[str, list[int]]:
    """Parameter and buffer shapes of the model `config` builds, on the meta device (nothing is allocated)."""
    from .model import BitTransformerLM  # model imports codec/telemetry; keep this module light

    try:
        with torch.device("meta"):
            state = BitTransformerLM(config).state_dict()
    except Exception as err:  # noqa: BLE001 - whatever stops the model from being built, said in one line
        raise CheckpointError(f"{source}: the model it describes cannot be built ({type(err).__name__}: {err})") \
            from None
    return {k: list(v.shape) for k, v in state.items()}


def from_pretrained(directory: str | Path, *, device: str | torch.device = "cpu"):
    """Load a model saved by save_pretrained (or any checkpoint directory); CheckpointError names a bad file."""
    from .model import BitTransformerLM

    config = read_config(directory)
    check_weights(directory, config)  # one line naming the file, before a loader's traceback
    model = BitTransformerLM(config)
    load_weights(model, directory)
    return model.to(device)


def load_weights(model, directory: str | Path) -> None:
    """Copy model.safetensors into an existing model; shapes and names must match exactly."""
    path = Path(directory) / WEIGHTS
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{path}: cannot be loaded ({err})") from None
    load_state(model, state, source=directory)


def load_state(model, state: dict[str, torch.Tensor], *, source: Any = "checkpoint") -> None:
    """Copy a full state dict into a plain model; names and shapes must match exactly."""
    target = getattr(model, "_orig_mod", model)
    missing, unexpected = target.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the model (missing {missing}, unexpected {unexpected})")


def _optimizer_payload(named: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for name, entries in named["state"].items():
        for field, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state/{name}/{field}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{name}/{field}"] = value
    return tensors, {"param_groups": named["param_groups"], "scalars": scalars}


def save_checkpoint(directory: str | Path, model, optimizer: torch.optim.Optimizer, trainer_state: dict, *,
                    state: Optional[tuple[dict[str, torch.Tensor], dict[str, Any]]] = None) -> Path:
    """Everything needed to resume training exactly, written atomically.

    `state` = (full model state, named optimizer state) when a distributed strategy gathered them;
    by default both are read from the plain `model` and `optimizer`.
    """
    directory = Path(directory)
    model_state, named = state if state is not None else (cpu_state(model), named_optimizer_state(model, optimizer))
    with atomic_directory(directory) as tmp:
        _write_model(tmp, model.config, model_state)
        tensors, meta = _optimizer_payload(named)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        _write_json(tmp / "optimizer.json", meta)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        _write_json(tmp / "trainer_state.json", trainer_state)
    return directory


def read_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict]:
    """(model state, named optimizer state, trainer state) of a checkpoint directory, on CPU."""
    directory = Path(directory)
    model_state = load_file(str(directory / "model.safetensors"))
    meta = json.loads((directory / "optimizer.json").read_text())
    state: dict[str, dict[str, Any]] = {}
    for key, value in load_file(str(directory / "optimizer.safetensors")).items():
        _, name, field = key.split("/")
        state.setdefault(name, {})[field] = value
    for key, value in meta["scalars"].items():
        name, field = key.split("/")
        state.setdefault(name, {})[field] = value
    named = {"state": state, "param_groups": meta["param_groups"]}
    return model_state, named, json.loads((directory / "trainer_state.json").read_text())


def restore_rng(directory: str | Path) -> None:
    """Set torch's generators to the states saved with a checkpoint."""
    rng = load_file(str(Path(directory) / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def load_checkpoint(directory: str | Path, model, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """Restore a plain model (and optimizer, RNG) from a checkpoint; returns its trainer state."""
    model_state, named, trainer_state = read_checkpoint(directory)
    load_state(model, model_state, source=directory)
    if optimizer is not None:
        load_named_optimizer_state(getattr(model, "_orig_mod", model), optimizer, named)
    restore_rng(directory)
    return trainer_state


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
