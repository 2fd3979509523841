"""Model sources for serving: a local directory under an allowed root, or an MLflow model URI; safetensors only."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, Optional

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_MLFLOW_URI = re.compile(r"^(runs|models):/")
_CHECKPOINT_DIR = re.compile(r"^(step-\d{8}|checkpoint_\d+)$")


class SourceError(ValueError):
    """A model source that cannot or may not be served; the message says which and why."""


def default_roots() -> list[Path]:
    """BITLM_SERVE_ROOTS (os.pathsep-separated), else the working directory."""
    env = os.environ.get("BITLM_SERVE_ROOTS")
    return [Path(p) for p in env.split(os.pathsep) if p] if env else [Path.cwd()]


def download_root() -> Path:
    """Where MLflow models are downloaded to (always an allowed root)."""
    return Path(os.environ.get("BITLM_SERVE_CACHE") or Path(tempfile.gettempdir()) / "bitlm-serve-models")


def resolve_source(source: str, allowed_roots: Optional[Iterable[str | Path]] = None) -> Path:
    """The save_pretrained-layout directory a source names, resolved and checked against the allowed roots.

    A local source may be a save_pretrained directory, a checkpoint directory (Ray Train's or
    `train --local`'s), or a run directory holding `model/` or checkpoint subdirectories (the
    newest is served). An MLflow `runs:/...` or `models:/...` URI is downloaded first.
    """
    roots = [Path(r).resolve() for r in (allowed_roots or default_roots())]
    if _MLFLOW_URI.match(source):
        local = _download(source)
        roots.append(download_root().resolve())
    else:
        local = Path(source).expanduser()
    try:
        resolved = local.resolve(strict=True)  # follows every symlink, so the check below sees the real place
    except (FileNotFoundError, RuntimeError):
        raise SourceError(f"model source {source!r}: no such directory") from None
    _check_inside(resolved, roots, source)
    model_dir = _model_directory(resolved, source)
    _check_inside(model_dir, roots, source)
    for name in (CONFIG, WEIGHTS):
        _check_inside((model_dir / name).resolve(strict=True), roots, source)
    return model_dir


def _check_inside(path: Path, roots: list[Path], source: str) -> None:
    if not any(path == root or path.is_relative_to(root) for root in roots):
        raise SourceError(f"model source {source!r} resolves to {path}, outside the allowed roots "
                          f"{[str(r) for r in roots]} (set BITLM_SERVE_ROOTS or allowed_roots)")


def _model_directory(path: Path, source: str) -> Path:
    if not path.is_dir():
        raise SourceError(f"model source {source!r}: {path} is not a directory")
    if (path / CONFIG).is_file():
        return _check_weights(path, source)
    if (path / "model" / CONFIG).is_file():  # `bitlm train` output, or an MLflow pyfunc's artifacts
        return _check_weights((path / "model").resolve(), source)
    if (path / "artifacts" / "model" / CONFIG).is_file():  # a downloaded MLflow pyfunc model
        return _check_weights((path / "artifacts" / "model").resolve(), source)
    checkpoints = sorted(p for p in path.iterdir() if p.is_dir() and _CHECKPOINT_DIR.match(p.name)
                         and (p / CONFIG).is_file())
    if not checkpoints and (path / "checkpoints").is_dir():
        return _model_directory(path / "checkpoints", source)
    if not checkpoints:
        raise SourceError(f"model source {source!r}: no {CONFIG} in {path} (nor model/, nor checkpoint subdirectories)")
    return _check_weights(max(checkpoints, key=lambda p: int(re.sub(r"\D", "", p.name))).resolve(), source)


def _check_weights(path: Path, source: str) -> Path:
    if (path / WEIGHTS).is_file():
        return path
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLED_SUFFIXES)
    if pickled:
        raise SourceError(f"model source {source!r}: {path} holds pickled weights {pickled}; only {WEIGHTS} "
                          "is loaded (pickles can run code) — convert with bitlm's save_pretrained")
    raise SourceError(f"model source {source!r}: {path} has no {WEIGHTS}")


def _download(uri: str) -> Path:
    """Download an MLflow model (its save_pretrained artifact included) into the serve cache."""
    import mlflow

    from bitlm.store import default_tracking_uri

    mlflow.set_tracking_uri(default_tracking_uri())  # the store training logs to
    root = download_root()
    root.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix="model-", dir=root))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target)))
    except Exception as err:  # MlflowException, or a store error: one clear message either way
        raise SourceError(f"model source {uri!r}: MLflow download failed: {err}") from None
    # a pyfunc logged by pipelines.tracking keeps the save_pretrained directory among its artifacts
    found = sorted({p.parent for p in local.rglob(CONFIG) if (p.parent / WEIGHTS).is_file()})
    if len(found) != 1:
        raise SourceError(f"model source {uri!r}: expected one bitlm model directory ({CONFIG} + {WEIGHTS}) "
                          f"in the download, found {len(found)}")
    return found[0]
