"""Model sources for serving: a local directory under an allowed root, an MLflow model URI or hf://user/repo; safetensors only."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Optional

from bitlm.checkpoint import WEIGHTS, CheckpointError, resolve_pretrained, validate_pretrained
from bitlm.store import default_tracking_uri

_MLFLOW_URI = re.compile(r"^(runs|models):/")
HUB_PREFIX = "hf://"  # hf://user/repo[@revision]: a Hugging Face Hub model, downloaded (or read from the cache)


class SourceError(CheckpointError):
    """A model source that cannot or may not be served; the message says which and why."""


def default_roots() -> list[Path]:
    """BITLM_SERVE_ROOTS (os.pathsep-separated), else the working directory."""
    env = os.environ.get("BITLM_SERVE_ROOTS")
    return [Path(p) for p in env.split(os.pathsep) if p] if env else [Path.cwd()]


def download_root() -> Path:
    """Where MLflow models are downloaded to, one folder per distinct model (always an allowed root)."""
    return Path(os.environ.get("BITLM_SERVE_CACHE") or Path(tempfile.gettempdir()) / "bitlm-serve-models")


def resolve_source(source: str, allowed_roots: Optional[Iterable[str | Path]] = None) -> Path:
    """The save_pretrained-layout directory a source names, resolved, checked against the roots and validated.

    A local source may be a save_pretrained directory, a checkpoint directory (Ray Train's or
    `train --local`'s), or a run directory (its `model/`, else its newest checkpoint); see
    bitlm.checkpoint.resolve_pretrained. An MLflow `runs:/...` or `models:/...` URI is downloaded
    first, and the download removed again when the source is refused; `hf://user/repo[@revision]`
    goes to the Hugging Face cache (bitlm.hub.download: checked against the Hub's hashes), whose
    folder of that repository becomes an allowed root. The model is checked by
    bitlm.checkpoint.validate_pretrained (config, format, tensor names and shapes) without loading it.
    """
    roots = [Path(r).resolve() for r in (allowed_roots or default_roots())]
    download = None
    if _MLFLOW_URI.match(source):
        download, local = _download(source)
        roots.append(download_root().resolve())
    elif source.startswith(HUB_PREFIX):
        local = hub_download(source)
        roots.append(local.resolve().parents[1])  # models--user--repo: its snapshots link into its blobs/
    else:
        local = Path(source).expanduser()
    try:
        return _checked(source, local, roots)
    except BaseException:
        if download is not None:
            shutil.rmtree(download, ignore_errors=True)
        raise


def _checked(source: str, local: Path, roots: list[Path]) -> Path:
    try:
        resolved = local.resolve(strict=True)  # follows every symlink, so the check below sees the real place
    except (FileNotFoundError, RuntimeError):
        raise SourceError(f"model source {source!r}: no such directory") from None
    _check_inside(resolved, roots, source)
    try:
        model_dir = resolve_pretrained(resolved).resolve()
        _check_inside(model_dir, roots, source)
        for name in ("config.json", WEIGHTS):
            if (model_dir / name).exists():
                _check_inside((model_dir / name).resolve(strict=True), roots, source)
        validate_pretrained(model_dir)
    except SourceError:
        raise
    except CheckpointError as err:  # the same line `bitlm generate` and `bitlm eval` print
        raise SourceError(f"model source {source!r}: {err}") from None
    return model_dir


def _check_inside(path: Path, roots: list[Path], source: str) -> None:
    if not any(path == root or path.is_relative_to(root) for root in roots):
        raise SourceError(f"model source {source!r} resolves to {path}, outside the allowed roots "
                          f"{[str(r) for r in roots]} (set BITLM_SERVE_ROOTS or allowed_roots)")


def _download(uri: str) -> tuple[Path, Path]:
    """(download directory, model directory in it) of an MLflow model; nothing is left behind on failure."""
    store = default_tracking_uri()  # the store training logs to
    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).is_file():
        # MLflow would create an empty store here just to find nothing in it
        raise SourceError(f"model source {uri!r}: no MLflow store at {store.removeprefix('sqlite:///')} "
                          "(run from the directory you trained in, or set MLFLOW_TRACKING_URI)")
    import mlflow

    mlflow.set_tracking_uri(store)
    root = download_root()
    root.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix="model-", dir=root))
    try:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target)))
        except Exception as err:  # MlflowException, or a store error: one clear message either way
            raise SourceError(f"model source {uri!r}: MLflow download failed: {err}") from None
        # a pyfunc logged by pipelines.tracking keeps the save_pretrained directory among its artifacts
        found = sorted({p.parent for p in local.rglob("config.json") if (p.parent / WEIGHTS).is_file()})
        if len(found) != 1:
            raise SourceError(f"model source {uri!r}: expected one bitlm model directory (config.json + {WEIGHTS}) "
                              f"in the download, found {len(found)}")
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return _keep_once(target, found[0])


def _keep_once(download: Path, model_dir: Path) -> tuple[Path, Path]:
    """Store a download under the hash of its model's files, so restarts do not pile up copies of one model.

    A `models:/name@alias` URI may point at another version tomorrow, so the key is the content
    (config.json and the weights), not the URI. A model already kept replaces the fresh download;
    the rename is atomic, so a concurrent server starting the same model keeps one of the two.
    """
    digest = hashlib.sha256()
    for name in ("config.json", WEIGHTS):
        part = hashlib.sha256()
        with (model_dir / name).open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                part.update(chunk)
        digest.update(part.digest())
    kept = download.parent / f"sha256-{digest.hexdigest()[:32]}"
    inside = model_dir.relative_to(download)
    if not (kept / inside / WEIGHTS).is_file():
        try:
            os.rename(download, kept)
            return kept, kept / inside
        except OSError:  # kept meanwhile by another process (or a stale, incomplete entry: replace it)
            if not (kept / inside / WEIGHTS).is_file():
                shutil.rmtree(kept, ignore_errors=True)
                os.rename(download, kept)
                return kept, kept / inside
    shutil.rmtree(download, ignore_errors=True)
    return kept, kept / inside


def hub_download(source: str) -> Path:
    """The local snapshot of an hf://user/repo[@revision] source; SourceError in one line when it cannot be had."""
    from bitlm.hub import HubError, download

    repo_id, _, revision = source.removeprefix(HUB_PREFIX).partition("@")
    try:
        return download(repo_id, revision=revision or None)
    except HubError as err:
        raise SourceError(f"model source {source!r}: {err}") from None
