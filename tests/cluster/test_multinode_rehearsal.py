"""Multi-node rehearsal on this machine (no cloud, no real GPU): a head and three worker nodes of a
`ray.cluster_utils.Cluster`, one with a logical GPU, in a subprocess (this process may hold the
session's Ray; the rehearsal starts and ends its own cluster and never touches another)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bitlm.data import prepare_corpus

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
TEXT = b"So shaken as we are, so wan with care, find we a time for frighted peace to pant. " * 300


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("rehearsal")
    (work / "text.txt").write_bytes(TEXT)
    prepare_corpus([work / "text.txt"], work / "data", window_bytes=256, val_fraction=0.1, progress=False)
    # its own short Ray temp dir (socket paths must fit in 107 bytes; /tmp/ray stays untouched)
    ray_tmp = Path(f"/tmp/bitlm-r{os.getpid()}")
    env = dict(os.environ, RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0",
               RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2", RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0")
    env.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run([sys.executable, str(REPO / "tests" / "cluster" / "rehearsal.py"), str(work)], env=env,
                              cwd=REPO, capture_output=True, text=True, timeout=400)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REHEARSAL ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads(lines[-1].removeprefix("REHEARSAL "))


def test_the_rehearsal_cluster_has_a_head_and_three_worker_nodes_one_with_a_gpu(rehearsal):
    assert len(set(rehearsal["workers"])) == 3 and rehearsal["head"] not in rehearsal["workers"]
    assert len(rehearsal["gpu_nodes"]) == 1 and rehearsal["gpu_nodes"][0] in rehearsal["workers"]


def test_training_workers_run_on_distinct_worker_nodes(rehearsal):
    nodes = rehearsal["train"]["rank_nodes"]
    assert rehearsal["train"]["step"] == 4
    assert len(nodes) == 2 and len(set(nodes)) == 2
    assert set(nodes) <= set(rehearsal["workers"])


def test_serve_answers_from_a_replica_on_a_worker_node(rehearsal):
    serve = rehearsal["serve"]
    assert serve["status"] == 200 and serve["n_bits"] > 0
    (replica_node,) = serve["replica_nodes"]
    assert replica_node in rehearsal["workers"] and replica_node != rehearsal["head"]
