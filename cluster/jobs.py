"""Jobs on a Ray cluster through its job API (ray.job_submission.JobSubmissionClient).

The project directory is the job's working dir (uploaded by Ray, minus what a job never needs:
the virtualenv, runs, corpora, git history, caches), and MLFLOW_TRACKING_URI is set in its
runtime environment, so `python -m pipelines.train` on the cluster logs where the submitter
looks. No ML code here: a job is an entry point and an environment.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
from pathlib import Path
from typing import Callable, Optional, Sequence

DEFAULT_ENTRYPOINT = ("python", "-m", "pipelines.train")
# gitignore-style, relative to the working dir; Ray itself skips .git, .venv and what .gitignore lists
EXCLUDES = ["venv", "runs", "data", "mlruns", "mlflow.db", "*.egg-info", "__pycache__", ".pytest_cache",
            ".hypothesis", "*.safetensors", "*.pt", "benchmarks/results", "serve_audit.jsonl"]
# Ray's own INFO lines in a job's log (runtime env set-up, the supervisor); kept with BITLM_VERBOSE=1
_RAY_INFO = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+\s+INFO \S+\.py:\d+ -- ")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class JobError(RuntimeError):
    """A job could not be submitted or read; the message says why."""


def job_client(address: str, auth_mode: Optional[str] = None):
    """A JobSubmissionClient for `address` (http://host:port of the dashboard)."""
    if auth_mode:
        from .state import use_auth_mode

        use_auth_mode(auth_mode)
    from ray.job_submission import JobSubmissionClient

    if not _verbose():
        _quiet_client_logs()
    return JobSubmissionClient(address)


def _verbose() -> bool:
    return os.environ.get("BITLM_VERBOSE", "").strip().lower() not in ("", "0", "false", "no", "off")


class _DropDefaultExcludeNotice(logging.Filter):
    """Ray 2.60 warns on every upload that .git/.venv are skipped, which is what we want."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is now ignored by default" not in record.getMessage()


def _quiet_client_logs() -> None:
    """The job client's INFO lines (packaging, upload, websocket); Ray sets these loggers to INFO at import."""
    # a logger's filters see only its own records: each logger that emits them gets one
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk", "ray._private.runtime_env",
                 "ray._private.runtime_env.working_dir", "ray._private.runtime_env.packaging"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        if not any(isinstance(f, _DropDefaultExcludeNotice) for f in logger.filters):
            logger.addFilter(_DropDefaultExcludeNotice())


def project_root(start: Optional[Path] = None) -> Path:
    """The nearest directory at or above `start` (default: cwd) holding pyproject.toml; else `start`."""
    start = (start or Path.cwd()).resolve()
    for directory in (start, *start.parents):
        if (directory / "pyproject.toml").is_file():
            return directory
    return start


def build_entrypoint(args: Sequence[str], working_dir: Path, config: Optional[str], sets: Sequence[str],
                     defaults: Sequence[str] = ()) -> str:
    """The job's command line: ARGS (default `python -m pipelines.train`) + --config + --set options.

    `defaults` are --set values placed before the user's, so the user's win (later overrides apply last).
    """
    argv = list(args) or list(DEFAULT_ENTRYPOINT)
    if config is not None:
        path = Path(config).resolve()
        if not path.is_file():
            raise JobError(f"--config {config}: no such file")
        try:
            relative = path.relative_to(working_dir)
        except ValueError:
            raise JobError(f"--config {config} is outside the working dir {working_dir}, which is what the "
                           "job receives; put the file inside it") from None
        argv += ["--config", relative.as_posix()]
    for item in (*defaults, *sets):
        if "=" not in item:
            raise JobError(f"--set {item!r}: expected KEY=VALUE")
        argv += ["--set", item]
    return shlex.join(argv)


def runtime_env(working_dir: Path, env_vars: dict[str, str]) -> dict:
    if not working_dir.is_dir():
        raise JobError(f"--working-dir {working_dir}: not a directory")
    return {"working_dir": str(working_dir), "excludes": list(EXCLUDES),
            "env_vars": {"RAY_USAGE_STATS_ENABLED": "0", **env_vars}}


def submit(client, entrypoint: str, env: dict, submission_id: Optional[str] = None) -> str:
    """Submit and return the job's submission id."""
    return client.submit_job(entrypoint=entrypoint, runtime_env=env, submission_id=submission_id)


def without_ray_info(text: str) -> str:
    """`text` less Ray's INFO lines, unless BITLM_VERBOSE asks for everything."""
    if _verbose():
        return text
    return "".join(line for line in text.splitlines(keepends=True) if not _RAY_INFO.match(line))


def follow(client, job_id: str, write: Callable[[str], None]) -> str:
    """Stream the job's log to `write` until it ends; return its final status."""
    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            kept = without_ray_info(chunk)
            if kept:
                write(kept)

    asyncio.run(tail())
    return wait(client, job_id)


def wait(client, job_id: str, poll_s: float = 0.5, timeout_s: Optional[float] = None) -> str:
    """The job's status once terminal (the log stream can end a moment before the status is final)."""
    import time

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(poll_s)


def describe(client, limit: int = 20) -> list[dict[str, str]]:
    """The newest submitted jobs first: id, status, start time (UTC), entrypoint."""
    import datetime

    rows = []
    submitted = [j for j in client.list_jobs() if j.submission_id]  # drivers that joined are not jobs to follow
    for info in sorted(submitted, key=lambda j: j.start_time or 0, reverse=True)[:limit]:
        started = (datetime.datetime.fromtimestamp(info.start_time / 1000, datetime.timezone.utc)
                   .strftime("%Y-%m-%d %H:%M:%S") if info.start_time else "-")
        rows.append({"id": info.submission_id or info.job_id or "?", "status": str(info.status.value),
                     "started": started, "entrypoint": info.entrypoint or ""})
    return rows
