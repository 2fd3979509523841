"""End to end on a real local cluster: `bitlm cluster up --local`, a submitted training job, its
MLflow run read over HTTP from the cluster's MLflow server, `bitlm train` joining the recorded
cluster, and `down --local` leaving none of the recorded processes alive.

Every command runs as its own process, as a user would type it. The cluster is ours alone: its own
state home, temp dir and ports; nothing here runs `ray stop` or joins a Ray it did not start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from bitlm.data import prepare_corpus
from cluster.state import LocalCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TEXT = b"So shaken as we are, so wan with care, find we a time for frighted peace to pant. " * 400
# a tiny run: 1 worker, 12 steps, evaluations at 6 and 12
TINY = ["run.num_workers=1", "train.max_steps=12", "train.eval_every=6", "train.checkpoint_every=6",
        "train.batch_size=4", "train.context_bytes=64", "train.log_every=3", "model.max_positions=64",
        "train.eval_batches=2"]


def _get(base: str, path: str, **query) -> dict:
    url = f"{base}/api/2.0/mlflow/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _post(base: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _run_of(base: str, experiment: str, run_name: str) -> dict:
    experiment_id = _get(base, "experiments/get-by-name", experiment_name=experiment)["experiment"]["experiment_id"]
    runs = _post(base, "runs/search", {"experiment_ids": [experiment_id],
                                       "filter": f"attributes.run_name = '{run_name}'"})["runs"]
    assert len(runs) == 1, runs
    return runs[0]


def test_up_submit_track_train_and_down(tmp_path):
    source = tmp_path / "text.txt"
    source.write_bytes(TEXT)
    data = tmp_path / "data"
    prepare_corpus([source], data, window_bytes=256, val_fraction=0.1, progress=False)
    env = dict(os.environ, BITLM_CLUSTER_HOME=str(tmp_path / "home"), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_API_SERVER_ADDRESS", "BITLM_VERBOSE"):
        env.pop(key, None)

    def bitlm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        started = time.monotonic()
        done = subprocess.run([str(BIN / "bitlm"), *args], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)
        print(f"bitlm {' '.join(args[:2])}: {time.monotonic() - started:.1f} s")  # shown with -s / on failure
        return done

    up = bitlm("cluster", "up", "--local", "--num-cpus", "2")
    assert up.returncode == 0, up.stdout + up.stderr
    cluster = LocalCluster.from_json((tmp_path / "home" / "local.json").read_text())
    try:
        assert cluster.dashboard_url.startswith("http://127.0.0.1:") and cluster.mlflow_uri.startswith("http://127.0.0.1:")
        assert len(cluster.temp_dir) < 40 and Path(cluster.temp_dir).is_dir()
        assert {p.name for p in cluster.leaders()} == {"ray start --head", "mlflow server"}
        assert len(cluster.processes) > 4  # the leaders' groups: GCS, raylet, dashboard, MLflow's worker ...

        again = bitlm("cluster", "up", "--local")
        assert again.returncode == 1 and "a local cluster is already running" in again.stderr

        status = bitlm("cluster", "status")
        assert status.returncode == 0, status.stderr
        assert "local cluster: running" in status.stdout and "health: OK" in status.stdout
        assert "ray status:" in status.stdout and "2.0 CPU" in status.stdout

        sets = [f"run.data={data}", f"run.storage_path={tmp_path / 'ray'}", "run.name=submitted",
                "run.experiment=jobs"] + TINY
        submit = bitlm("cluster", "submit", "--config", "pipelines/configs/tiny-cpu.json",
                       *[a for s in sets for a in ("--set", s)])
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "SUCCEEDED" in submit.stderr and submit.stdout.count("step 6: val/bpb") == 1
        assert "INFO" not in submit.stdout + submit.stderr  # our lines, not Ray's bookkeeping
        job_id = submit.stderr.split("submitted ")[1].split()[0]

        listed = bitlm("cluster", "jobs", "--json")
        assert {"id": job_id, "status": "SUCCEEDED"}.items() <= json.loads(listed.stdout.splitlines()[0]).items()
        logs = bitlm("cluster", "logs", job_id)
        assert "step 12: val/bpb" in logs.stdout

        # the job's MLflow run, over plain HTTP from the cluster's server
        run = _run_of(cluster.mlflow_uri, "jobs", "submitted")
        assert run["info"]["status"] == "FINISHED"
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["train.max_steps"] == "12" and params["run.num_workers"] == "1"
        assert {"val/bpb", "train/loss", "bits_per_s"} <= {m["key"] for m in run["data"]["metrics"]}
        artifacts = _get(cluster.mlflow_uri, "artifacts/list", run_id=run["info"]["run_id"])
        assert "metrics.json" in {f["path"] for f in artifacts["files"]}
        experiment_id = run["info"]["experiment_id"]
        (model,) = _post(cluster.mlflow_uri, "logged-models/search", {
            "experiment_ids": [experiment_id], "filter": f"source_run_id = '{run['info']['run_id']}'"})["models"]
        files = _get(cluster.mlflow_uri, f"logged-models/{model['info']['model_id']}/artifacts/directories",
                     artifact_directory_path="artifacts/model")["files"]
        assert {"artifacts/model/model.safetensors", "artifacts/model/config.json"} <= {f["path"] for f in files}

        # a plain `bitlm train` (no --address, no MLFLOW_TRACKING_URI) runs on the recorded cluster
        short = [s for s in TINY if not s.startswith(("train.max_steps", "train.eval_every", "train.checkpoint_every"))]
        train = bitlm("train", "--data", str(data), "--out", str(tmp_path / "runs" / "joined"), "--preset", "tiny",
                      "--steps", "3", *[a for s in short + ["train.eval_every=3"] for a in ("--set", s)])
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
        joined = _run_of(cluster.mlflow_uri, "bitlm", "joined")
        assert joined["info"]["status"] == "FINISHED"
        assert len(bitlm("cluster", "jobs", "--json").stdout.splitlines()) == 1  # it joined as a driver, not a job
    finally:
        down = bitlm("cluster", "down", "--local")
    assert down.returncode == 0, down.stderr
    assert "stopped the local cluster" in down.stdout
    assert not [p for p in cluster.processes if p.alive()]
    assert not (tmp_path / "home" / "local.json").exists() and not Path(cluster.temp_dir).exists()
