"""The audit log: one JSON line per gate verdict, appended under a lock (threads) and flock (replicas)."""

from __future__ import annotations

import fcntl
import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


class AuditLogError(ValueError):
    """An audit log path that cannot take records (a directory, a read-only place); the message names it."""


class AuditLog:
    """Appends records to a JSON-lines file; each record is written with one write() call."""

    def __init__(self, path: str | Path):
        """Open (creating) the log once, so a path that cannot take records fails here, at start-up."""
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
        except OSError as err:
            why = f"{self.path.parent} is not a directory" if isinstance(err, FileExistsError) else \
                err.strerror or type(err).__name__
            raise AuditLogError(f"audit log {self.path}: cannot be opened for appending ({why})") from None
        self._lock = threading.Lock()

    def record(self, request_id: str, verdict: dict[str, Any], **context: Any) -> dict[str, Any]:
        """Append {"ts", "request_id", **context, "verdict"}; returns the record."""
        entry = {"ts": datetime.now(timezone.utc).isoformat(timespec="microseconds"), "request_id": request_id,
                 **context, "verdict": verdict}
        # json escapes newlines inside strings, so generated text cannot split a record
        line = (json.dumps(entry, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # replicas are separate processes appending to one file
                view = memoryview(line)
                while view:  # os.write may write less than asked
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)  # closing releases the flock
        return entry

    def read(self) -> list[dict[str, Any]]:
        """Every record, oldest first."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line]
