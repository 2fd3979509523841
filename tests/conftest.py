"""One local Ray for every Ray test (pipelines, serve): started once per session with 2 CPUs, shut down at the end."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

# Hypothesis fails an example that runs over 200 ms by default: a timing assert, which a loaded
# CI machine trips (a compression property took 489 ms once). Speed is measured in benchmarks/.
settings.register_profile("bitlm", deadline=None)
settings.load_profile("bitlm")

from serve.local import free_port, wait_for  # noqa: F401 - test modules import them from here too

BIN = Path(sys.executable).parent

# A developer's running `bitlm cluster up --local` is recorded under ~/.bitlm/cluster, and every
# command without an address joins it: the suite (and the processes it starts) must never see it.
os.environ["BITLM_CLUSTER_HOME"] = tempfile.mkdtemp(prefix="bitlm-tests-cluster-")

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"
# the stand-in when ../shared is absent
TEXT = (b"the quick brown fox jumps over the lazy dog. " * 60 + b"pack my box with five dozen liquor jugs! " * 60)


@pytest.fixture(scope="session")
def ray_local():
    """A session-wide local Ray (num_cpus=2, no dashboard); tests needing another cluster run in a subprocess."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # faster failure detection and no preemption watcher: the fixed cost of a TorchTrainer.fit drops
    # from ~12 s to ~9 s on these machines (see NOTES-ray-mlflow.md)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    import ray

    if not ray.is_initialized():
        # address="local": always a new instance, never another process's cluster on this machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=128 << 20, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_head(tmp_path):
    """A separate single-node Ray head with a dashboard on 127.0.0.1 (killed with its children at the end)."""
    dashboard = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    # a short temp dir: Ray's socket paths must fit in 107 bytes
    temp_dir = Path("/tmp") / f"bitlm-head-{os.getpid()}-{dashboard}"
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={free_port()}",  # the default 52365 may be taken by another Ray
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{dashboard}/api/version", 120)
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """A small prepared corpus for Ray runs (60 kB of tinyshakespeare, 256-byte windows); modules may define their own."""
    from bitlm.data import prepare_corpus

    text = SHAKESPEARE.read_bytes()[:60_000] if SHAKESPEARE.is_file() else TEXT
    out = tmp_path_factory.mktemp("corpus") / "data"
    source = out.parent / "source.txt"
    source.write_bytes(text)
    prepare_corpus([source], out, window_bytes=256, val_fraction=0.1)
    return out


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """An MLflow client on a fresh SQLite store that MLFLOW_TRACKING_URI names for the module's runs."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        yield MlflowClient(tracking_uri=uri)

