"""Where runs are tracked: the one rule that training, `bitlm ui` and the server share.

Kept free of mlflow imports (bitlm never imports mlflow), so the CLI and the server can name the
store without loading MLflow.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else a SQLite store in the working directory (absolute path)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve()}/mlflow.db"
