"""One local Ray for every Ray test (pipelines, serve): started once per session with 2 CPUs, shut down at the end."""

from __future__ import annotations

import os

import pytest


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
