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
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checkpoint_format import (  # noqa: F401  (PICKLED_SUFFIXES, CheckpointWarning: re-exported)
    FORMAT, PICKLED_SUFFIXES, WEIGHTS, CheckpointError, CheckpointWarning, check_weights, checkpoint_problem,
    read_config, read_quantization)
from .config import ModelConfig, to_dict
from .state import cpu_state, load_named_optimizer_state, load_state, named_optimizer_state, unwrap

_STEP_DIR = re.compile(r"^step-(\d{8})$")
_CHECKPOINT_DIR = re.compile(r"^(step-\d{8}|checkpoint_\d+)$")  # train --local's, Ray Train's


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


def write_model(directory: Path, config: ModelConfig, state: dict[str, torch.Tensor],
                 quantization: Optional[dict] = None) -> None:
    extra = {"quantization": quantization} if quantization else {}  # bitlm.quantization's record
    _write_json(directory / "config.json", {"format": FORMAT, "model": to_dict(config)} | extra)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": FORMAT})


def save_pretrained(model, directory: str | Path) -> Path:
    """Write config.json + model.safetensors atomically; returns the directory."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        write_model(tmp, model.config, cpu_state(model), getattr(model, "quantization", None))
    return directory


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


def from_pretrained(directory: str | Path, *, device: str | torch.device = "cpu"):
    """Load a model saved by save_pretrained (or any checkpoint directory); CheckpointError names a bad file."""
    from .model import BitTransformerLM

    config = read_config(directory)
    check_weights(directory, config)  # one line naming the file, before a loader's traceback
    quantization = read_quantization(directory)
    if quantization is None:
        model = BitTransformerLM(config)
    else:  # quantized layers built empty, then filled from the safetensors like any other weights
        from .quantization import build_quantized

        if torch.device(device).type != "cpu":
            raise CheckpointError(f"{directory}: a {quantization['method']} model runs on CPU only "
                                  f"(asked for {device})")
        model = build_quantized(config, quantization)
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
        write_model(tmp, model.config, model_state)
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
    """(model state, named optimizer state, trainer state) of a checkpoint directory, on CPU.

    CheckpointError, naming the directory and the file, when a file is missing or damaged.
    """
    directory = Path(directory)
    problem = checkpoint_problem(directory, by_fit=False)
    if problem is not None:
        raise CheckpointError(f"{directory}: {problem}")
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
        load_named_optimizer_state(unwrap(model), optimizer, named)
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
    """The newest checkpoint under `root` that can be resumed from, or None when there is none.

    A damaged newer one (a missing, truncated or malformed file) is skipped with a CheckpointWarning
    naming it; when every checkpoint is damaged, CheckpointError lists them.
    """
    skipped: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(root)):
        problem = checkpoint_problem(path)
        if problem is None:
            for bad, why in skipped:
                warnings.warn(f"skipping damaged checkpoint {bad}: {why}; resuming from {path.name}",
                              CheckpointWarning, stacklevel=2)
            return path
        skipped.append((path, problem))
    if skipped:
        listed = "; ".join(f"{path.name}: {why}" for path, why in skipped)
        raise CheckpointError(f"{root}: no checkpoint can be resumed from ({listed}); "
                              "start a new run (--no-resume, or another directory)")
    return None


def remove_stale_temporaries(root: str | Path, targets: str = r"step-\d{8}") -> list[Path]:
    """Remove what an interrupted atomic_directory left next to the directories named `targets` under `root`.

    A ".<target>.old" whose <target> is gone (a kill between the two renames) is put back instead.
    Call it only where `root` has one writer, before that writer starts: a live write's temp dir
    looks the same. Returns the removed paths.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    pattern = re.compile(rf"^\.({targets})\.(.+)$")
    entries = sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and pattern.match(p.name))
    removed = []
    for path in entries:  # first put back a lone .old: it is the only copy of its target
        name, suffix = pattern.match(path.name).group(1, 2)
        if suffix == "old" and not (root / name).exists():
            os.replace(path, root / name)
    for path in entries:
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
