"""What a bitlm model or checkpoint directory holds, and the checks that read only its JSON and safetensors headers.

bitlm.checkpoint writes and loads directories; this module says whether one can be used (without
reading its tensors), so a bad file is named in one line before any loader's traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open

from .config import ModelConfig, from_dict

FORMAT = "bitlm/1"
WEIGHTS = "model.safetensors"
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
CHECKPOINT_FILES = ("config.json", "model.safetensors", "optimizer.safetensors", "optimizer.json",
                    "trainer_state.json", "rng.safetensors")


class CheckpointError(ValueError):
    """A model or checkpoint directory that cannot be loaded or resumed; the message names the path and the fault."""


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped on resume in favour of an older, loadable one."""


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


def read_quantization(directory: str | Path) -> Optional[dict]:
    """How the model in a directory is quantized (see bitlm.quantization), or None for full precision."""
    path = Path(directory) / "config.json"
    try:
        spec = json.loads(path.read_bytes()).get("quantization")
    except (OSError, ValueError, AttributeError):
        return None  # read_config says what is wrong with the file
    if spec is None:
        return None
    from .quantization import check_spec

    try:
        return check_spec(spec, path)
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def check_weights(directory: str | Path, config: ModelConfig) -> None:
    """CheckpointError unless directory/model.safetensors holds exactly the tensors of `config`'s model."""
    directory = Path(directory)
    path = directory / WEIGHTS
    # a pickle beside the weights is refused too: a loader that prefers it would run its code
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLED_SUFFIXES)
    if pickled:
        raise CheckpointError(f"{directory}: holds pickled weights {pickled}; only {WEIGHTS} is loaded "
                              "(pickles can run code): remove them, or convert with bitlm's save_pretrained")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file" if path.exists() else f"{path}: not found")
    found = _tensor_shapes(path)
    expected = _model_shapes(config, directory / "config.json", read_quantization(directory))
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
            head = f.read(9)
        # a safetensors file is an 8-byte little-endian header length, then the JSON header ("{");
        # only a file that is not one is sniffed for a pickle, whose first byte 0x80 is also the low
        # byte of one safetensors header length in 256
        header_length = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
        safetensors_like = head[8:9] == b"{" and 0 < header_length <= path.stat().st_size - 8
        if not safetensors_like and (head[:2] == b"PK" or head[:1] == b"\x80"):  # torch.save's zip, a bare pickle
            raise CheckpointError(f"{path}: a pickle (torch.save) file, not safetensors; pickles can run code "
                                  "and are never loaded")
        with safe_open(str(path), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror or err})") from None
    except SafetensorError as err:
        raise CheckpointError(f"{path}: truncated or not a safetensors file ({path.stat().st_size} bytes; "
                              f"{str(err).removeprefix('Error while deserializing header: ')})") from None


def _model_shapes(config: ModelConfig, source: Path, quantization: Optional[dict] = None) -> dict[str, list[int]]:
    """Parameter and buffer shapes of the model `config` builds, on the meta device (nothing is allocated)."""
    from .model import BitTransformerLM  # model imports codec/telemetry; keep this module light
    from .quantization import build_quantized

    try:
        with torch.device("meta"):
            state = (build_quantized(config, quantization) if quantization else BitTransformerLM(config)).state_dict()
    except Exception as err:  # noqa: BLE001 - whatever stops the model from being built, said in one line
        raise CheckpointError(f"{source}: the model it describes cannot be built ({type(err).__name__}: {err})") \
            from None
    return {k: list(v.shape) for k, v in state.items()}


def checkpoint_problem(directory: str | Path, *, by_fit: bool = True) -> Optional[str]:
    """What keeps a checkpoint directory from being resumed (a missing, truncated or malformed file), or None.

    Reads the JSON files and the safetensors headers, not the tensors: cheap for any model size.
    by_fit: the trainer state must also hold what engine.fit resumes from (step, train_seconds, history).
    """
    directory = Path(directory)
    for name in CHECKPOINT_FILES:
        if not (directory / name).is_file():
            return f"{name} is missing"
    documents = {}
    for name in ("config.json", "optimizer.json", "trainer_state.json"):
        try:
            documents[name] = json.loads((directory / name).read_bytes())
        except (OSError, ValueError) as err:
            return f"{name} is not valid JSON ({err})"
        if not isinstance(documents[name], dict):
            return f"{name} holds a JSON {type(documents[name]).__name__}, not an object"
    try:
        check_weights(directory, read_config(directory))  # names, shapes, truncation, pickles
    except (OSError, ValueError) as err:  # CheckpointError is a ValueError
        return str(err).replace(f"{directory}{os.sep}", "")  # the caller names the directory
    trainer = documents["trainer_state.json"]
    required = (("step", int), ("train_seconds", (int, float)), ("history", list)) if by_fit else ()
    for key, kind in required:
        if not isinstance(trainer.get(key), kind) or isinstance(trainer.get(key), bool):
            return f"trainer_state.json: {key!r} is missing or not a {getattr(kind, '__name__', 'number')}"
    meta = documents["optimizer.json"]
    if not isinstance(meta.get("param_groups"), list) or not isinstance(meta.get("scalars"), dict):
        return "optimizer.json: 'param_groups' (a list) or 'scalars' (an object) is missing"
    for name in ("optimizer.safetensors", "rng.safetensors"):
        problem = _safetensors_problem(directory / name)
        if problem is not None:
            return f"{name} {problem}"
    return None


def _safetensors_problem(path: Path) -> Optional[str]:
    """Why `path` is not a complete safetensors file (its header is read, its tensors are not), or None."""
    size = path.stat().st_size
    if size < 8:
        return f"is truncated ({size} bytes)"
    with path.open("rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        if header_size > size - 8:
            return f"is truncated or not a safetensors file (a {header_size}-byte header in {size} bytes)"
        try:
            header = json.loads(f.read(header_size))
            end = max((int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
                      default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "is not a safetensors file (its header is not valid)"
    expected = 8 + header_size + end
    if size != expected:
        return f"is truncated ({size} of {expected} bytes)" if size < expected else \
            f"has {size - expected} bytes after its tensors"
    return None
