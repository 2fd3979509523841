"""Run directories: the marker that makes a directory ours, the corpus its run trained on, and clearing it for a fresh run."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

MARKER = ".bitlm-run"
FORMAT = "bitlm-run/1"
# What our runs write at the top of a run directory: --local (config.json, metrics.jsonl,
# checkpoints/, model/), the Ray driver and workers (mlflow_run_id, workers/, injected-failure),
# Ray Train's storage of a run at <storage_path>/<name> (step-*/ checkpoints, its snapshot and
# marker), and the temporary directories an interrupted atomic save leaves (.model.*, .step-*.*).
_OURS = re.compile(r"^(\.bitlm-run(\.tmp)?|config\.json|metrics\.jsonl(\.tmp)?|checkpoints|model|mlflow_run_id|workers|"
                   r"injected-failure|checkpoint_manager_snapshot\.json|\.validate_storage_marker|step-\d{8}|"
                   r"\.(model|step-\d{8})\..+)$")
# Entries only a run writes: a directory from before the marker existed counts as ours when it
# holds one of these and nothing but our names.
_RUN_ONLY = re.compile(r"^(metrics\.jsonl|checkpoints|mlflow_run_id|checkpoint_manager_snapshot\.json|step-\d{8})$")
_STEP = re.compile(r"^step-\d{8}$")


class RunDirectoryError(ValueError):
    """A run directory this run may not use; the message names the path and the reason, `option` the flag."""

    def __init__(self, message: str, option: str = "--out"):
        super().__init__(message)
        self.option = option


def prepare_run_directory(out: str | Path, data: str | Path, *, fresh: bool, corpus: Optional[str] = None) -> Path:
    """Make `out` ready for a run on the corpus at `data`; returns it resolved. Deletes nothing that is not ours.

    Refused (RunDirectoryError): an `out` that contains `data` or the working directory, a file,
    or a non-empty directory no run of ours wrote. `fresh` removes what an earlier run wrote and
    is refused if anything else is there. `corpus` (bitlm.data.corpus_identity) is recorded in
    the marker; resuming a run that has checkpoints on another corpus is refused.
    """
    out, data = Path(out).resolve(), Path(data).resolve()
    if data == out or out in data.parents:
        raise RunDirectoryError(f"{out} contains the data ({data}); choose a run directory outside it")
    cwd = Path.cwd().resolve()
    if cwd == out or out in cwd.parents:
        raise RunDirectoryError(f"{out} is or contains the working directory; choose a run directory below it, "
                                "e.g. runs/NAME")
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"{out} is not a directory")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if entries and not _is_ours(entries):
        foreign = next((e for e in entries if not _OURS.match(e.name)), entries[0])
        raise RunDirectoryError(f"{out} holds {foreign.name}, and no bitlm run wrote this directory (no {MARKER}); "
                                "choose a new or empty run directory")
    state = _read_marker(out)
    if fresh and entries:
        foreign = [e for e in entries if not _OURS.match(e.name)]
        if foreign:
            raise RunDirectoryError(f"{out} holds {foreign[0].name}, which no bitlm run wrote; a fresh run removes "
                                    "only an earlier run's files: move it away or choose another run directory")
        for entry in entries:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        state = {}
    recorded = state.get("corpus")
    if corpus is not None and recorded is not None and recorded != corpus and has_checkpoints(out):
        raise RunDirectoryError(
            f"{data} is a different corpus from the one the run in {out} was trained on "
            f"({state.get('data', '?')}, recorded in {MARKER}); resume with the original data, or pass "
            "--no-resume (Ray jobs: another run.name) to start over", option="--data")
    if corpus is not None:
        state = {"corpus": corpus, "data": str(data)}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{MARKER}.tmp"
    tmp.write_text(json.dumps({"format": FORMAT, **state}) + "\n")
    os.replace(tmp, out / MARKER)
    return out


def has_checkpoints(out: str | Path) -> bool:
    """Whether a run directory holds a checkpoint to resume from (--local: checkpoints/step-*, Ray: step-*)."""
    return any(p.is_dir() and _STEP.match(p.name)
               for root in (Path(out), Path(out) / "checkpoints") if root.is_dir() for p in root.iterdir())


def _is_ours(entries: list[Path]) -> bool:
    names = [e.name for e in entries]
    if MARKER in names:
        return True
    return all(_OURS.match(n) for n in names) and any(_RUN_ONLY.match(n) for n in names)


def _read_marker(out: Path) -> dict:
    try:
        state = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in state.items() if k in ("corpus", "data")} if isinstance(state, dict) else {}


def run_safety_config(model_dir: str | Path):
    """The `safety` section of the run that holds a model directory, as a SafetyConfig, and the file it came from.

    `bitlm train` (--local and on Ray) writes <run>/config.json beside <run>/model, and a Ray
    Train checkpoint sits one level further down (<run>/step-N); a model with no such run
    config (a download, a bare save_pretrained directory) gets SafetyConfig's defaults and None.
    ValueError, naming the file, when the section is there but invalid.
    """
    from .config import SafetyConfig, from_dict

    model_dir = Path(model_dir)
    for candidate in (model_dir.parent / "config.json", model_dir.parent.parent / "config.json"):
        try:
            section = json.loads(candidate.read_text()).get("safety")
        except (OSError, ValueError, AttributeError):  # no run config here, unreadable, or not an object
            continue
        if isinstance(section, dict):
            try:
                return from_dict(SafetyConfig, section), candidate
            except ValueError as err:
                raise ValueError(f"{candidate}: {err}") from None
    return SafetyConfig(), None

