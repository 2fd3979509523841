"""`bitlm demo` end to end in a fresh process: it trains, serves one gated request, and its console shows our lines only."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow

# What the unquieted console showed (issue 10, item 15); none of it may reach a default run's console.
FORBIDDEN = [
    r"Token authentication is enabled",
    r"PreemptionWatcher",
    r"Creating initial MLflow database tables",
    r"graceful_shutdown failed",
    r"\bINFO\b",
    r"Downloading artifacts",
]


def test_demo_console_is_ours(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "BITLM_", "MLFLOW_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(
        [str(BIN / "bitlm"), "demo", "--out", str(tmp_path / "demo"), "--minutes", "0.1",
         "--max-corpus-bytes", "200000"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    assert re.search(r"val bits/byte on the same [\d,]+ bytes: model \d+\.\d{3} \| gzip -9 \d+\.\d{3}", console)
    assert '"passed"' in console  # the gated request's verdict was printed
    for pattern in FORBIDDEN:
        hits = [line for line in console.splitlines() if re.search(pattern, line)]
        assert not hits, f"{pattern!r} reached the console: {hits[:3]}"
