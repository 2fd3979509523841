"""Hugging Face Hub sync of the save_pretrained layout: push with a model card of measured facts, pull checked against the Hub's hashes.

The token comes from the `token` argument or HF_TOKEN and is only ever handed to the
huggingface_hub client: never printed, logged, put in the card or written to a file here.
HF_HUB_OFFLINE=1 (read by huggingface_hub when it is first imported) makes a pull use the local
cache only. huggingface_hub is imported inside the functions: `import bitlm` stays light.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from .checkpoint import WEIGHTS, CheckpointError, from_pretrained as _load_directory, validate_pretrained

FILES = ("config.json", WEIGHTS)  # what is pushed and pulled, besides the card
CARD = "README.md"
# the Hub's rule for a model id: namespace/name, letters, digits, '-', '_', '.', no '--' or '..', at most 96 each
_PART = r"(?!.*(--|\.\.))[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"^{_PART}/{_PART}$")


class HubError(CheckpointError):
    """A Hub push or pull that cannot go ahead; the message says which repository and why, in one line."""


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if it is a Hub model id ("user/name"), else HubError."""
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id):
        raise HubError(f"repo id {repo_id!r}: must be 'user/name' (letters, digits, '-', '_', '.'; "
                       "no '--' or '..'; at most 96 characters each)")
    return repo_id


def _token(token: Optional[str]) -> Optional[str]:
    return token or os.environ.get("HF_TOKEN") or None


def _git_blob_sha1(path: Path) -> str:
    """The git blob id the Hub lists for a file stored in git (not LFS)."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_facts(model_dir: Path) -> dict[str, Any]:
    """What a run directory around `model_dir` recorded: corpus identity, training config, last val bpb."""
    run = model_dir.parent
    facts: dict[str, Any] = {}
    try:
        facts["corpus"] = json.loads((run / ".bitlm-run").read_text()).get("corpus")
    except (OSError, ValueError, AttributeError):
        pass
    try:
        facts["train"] = json.loads((run / "config.json").read_text())["train"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        scored = [m for m in lines if isinstance(m, dict) and "val/bpb" in m]
        if scored:
            facts["val_bpb"], facts["val_step"] = scored[-1]["val/bpb"], scored[-1].get("step")
    except (OSError, ValueError):
        pass
    return {k: v for k, v in facts.items() if v is not None}


def model_card(model_dir: str | Path, repo_id: str, measured: Optional[dict[str, float]] = None) -> str:
    """A README.md for the Hub: config, parameter count, quantization, the run's corpus and training, and
    the bpb numbers in `measured` (name -> bits per byte, e.g. this model, the byte baseline, gzip -9).
    Only facts read from the directory and its run, or passed in as measured, are written."""
    from .checkpoint import read_quantization
    from .quantization import storage_report

    model_dir = Path(model_dir)
    model = _load_directory(model_dir)
    config = json.loads((model_dir / "config.json").read_text())["model"]
    report = storage_report(model)
    quantization = read_quantization(model_dir)
    facts = run_facts(model_dir)
    kind = "byte baseline" if config["representation"] == "byte" else f"{config['arch']} bit model"
    lines = ["---", "library_name: bitlm", "tags:", "- bitlm", "- bit-level-language-model", "---", "",
             f"# {repo_id}", "",
             f"A bitlm {kind} ({report['n_parameters']:,} parameters), in bitlm's save_pretrained layout "
             f"(config.json + {WEIGHTS}). Load it with `bitlm.hub.from_pretrained({repo_id!r})` or "
             f"`bitlm hub pull {repo_id}`.", "",
             "## Weights", "",
             f"- format: {quantization['method'] if quantization else 'fp32'}"
             + (f" (group size {quantization['group_size']})" if quantization and "group_size" in quantization else ""),
             f"- {WEIGHTS}: {(model_dir / WEIGHTS).stat().st_size:,} bytes; linear layers "
             f"{report['linear_bits_per_weight']:.2f} bits per weight, whole model "
             f"{report['bits_per_parameter']:.2f} bits per parameter", "",
             "## Model config", "", "```json", json.dumps(config, indent=2, sort_keys=True), "```", ""]
    if "corpus" in facts or "train" in facts:
        lines += ["## Training", ""]
        if "corpus" in facts:
            lines.append(f"- training data: corpus manifest hash (bitlm.data.corpus_identity) `{facts['corpus']}`")
        if "train" in facts:
            t = facts["train"]
            lines.append(f"- {t.get('max_steps')} steps at most"
                         + (f" or {t['max_seconds'] / 60:.1f} minutes" if t.get("max_seconds") else "")
                         + f", batch {t.get('batch_size')} x {t.get('context_bytes')} bytes, lr {t.get('lr')}, "
                         f"schedule {t.get('schedule')}" + (", 4-bit QAT" if t.get("qat") else ""))
        if "val_bpb" in facts:
            lines.append(f"- validation bits per byte at step {facts.get('val_step')}: {facts['val_bpb']:.4f} "
                         "(held-out split of the training corpus, full-precision weights during training)")
        lines.append("")
    if measured:
        lines += ["## Measured bits per byte", "", "| model | bits per byte |", "|---|---|"]
        lines += [f"| {name} | {value:.4f} |" for name, value in measured.items()]
        lines.append("")
    return "\n".join(lines)


def push_to_hub(model_dir: str | Path, repo_id: str, token: Optional[str] = None, private: bool = True, *,
                measured: Optional[dict[str, float]] = None, commit_message: str = "Upload bitlm model") -> str:
    """Create `repo_id` (private by default) if needed and upload config.json, the weights and a model card.

    Returns the commit id. The directory is validated first (safetensors only, tensors matching the config).
    """
    check_repo_id(repo_id)
    model_dir = Path(model_dir)
    try:
        validate_pretrained(model_dir)
    except (CheckpointError, FileNotFoundError) as err:
        raise HubError(f"push to {repo_id}: {err}") from None
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    card = model_card(model_dir, repo_id, measured)
    api = HfApi(token=_token(token))
    with tempfile.TemporaryDirectory(prefix="bitlm-push-") as staging:
        for name in FILES:
            shutil.copy2(model_dir / name, Path(staging) / name)
        (Path(staging) / CARD).write_text(card)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.upload_folder(folder_path=staging, repo_id=repo_id, repo_type="model",
                                     commit_message=commit_message)
        except HfHubHTTPError as err:
            raise HubError(f"push to {repo_id}: {_one_line(err)}") from None
    return info.oid


def download(repo_id: str, *, revision: Optional[str] = None, token: Optional[str] = None,
             cache_dir: Optional[str | Path] = None) -> Path:
    """The local directory of `repo_id`'s model (downloaded into the Hub cache, or from it when offline).

    Online, every file is checked against the Hub's own hash (sha256 for LFS files, the git blob id
    otherwise) before it is used; a mismatch removes the download and raises HubError.
    """
    check_repo_id(repo_id)
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import constants
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    token = _token(token)
    try:
        local = Path(snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                       allow_patterns=[*FILES, CARD]))
        if not constants.HF_HUB_OFFLINE:
            info = HfApi(token=token).model_info(repo_id, revision=revision, files_metadata=True)
            _check_hashes(repo_id, local, {s.rfilename: s for s in info.siblings or []})
    except RepositoryNotFoundError:
        raise HubError(f"pull {repo_id}: no such model repository (or no access to it: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise HubError(f"pull {repo_id}: revision {revision!r} not found") from None
    except LocalEntryNotFoundError:
        raise HubError(f"pull {repo_id}: not in the local cache, and the Hub cannot be reached "
                       f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r})") from None
    except (EntryNotFoundError, HfHubHTTPError) as err:
        raise HubError(f"pull {repo_id}: {_one_line(err)}") from None
    missing = [name for name in FILES if not (local / name).is_file()]
    if missing:
        raise HubError(f"pull {repo_id}: the repository has no {' or '.join(missing)}: not a bitlm model")
    try:
        validate_pretrained(local)
    except CheckpointError as err:
        raise HubError(f"pull {repo_id}: {err}") from None
    return local


def _check_hashes(repo_id: str, local: Path, remote: dict[str, Any]) -> None:
    for name in (*FILES, CARD):
        path, sibling = local / name, remote.get(name)
        if sibling is None or not path.is_file():
            continue
        lfs = getattr(sibling, "lfs", None)
        expected, actual = (lfs.sha256, _sha256(path)) if lfs else (sibling.blob_id, _git_blob_sha1(path) if
                                                                     sibling.blob_id else None)
        if expected and actual != expected:
            (path.resolve()).unlink(missing_ok=True)  # the cached blob the snapshot links to
            raise HubError(f"pull {repo_id}: {name} does not match the Hub's hash ({actual} != {expected}); "
                           "the download was removed")


def from_pretrained(repo_id: str, *, revision: Optional[str] = None, token: Optional[str] = None,
                    cache_dir: Optional[str | Path] = None, device: str = "cpu"):
    """Load a bitlm model from the Hub (or the local cache when offline); quantized models included."""
    return _load_directory(download(repo_id, revision=revision, token=token, cache_dir=cache_dir), device=device)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:300]
