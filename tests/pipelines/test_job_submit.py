"""`ray job submit` of the training pipeline against a local head started with `ray start --head`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bitlm.data import prepare_corpus

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TEXT = b"So shaken as we are, so wan with care, find we a time for frighted peace to pant. " * 400


def test_ray_job_submit_trains_and_the_mlflow_run_holds_params_metrics_and_a_model(ray_head, tmp_path):
    address, env = ray_head
    source = tmp_path / "text.txt"
    source.write_bytes(TEXT)
    prepare_corpus([source], tmp_path / "data", window_bytes=256, val_fraction=0.1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": uri, "RAY_USAGE_STATS_ENABLED": "0"}}
    sets = [f"run.data={tmp_path / 'data'}", f"run.storage_path={tmp_path / 'ray'}", "run.name=submitted",
            "run.experiment=jobs", "run.num_workers=1", "train.max_steps=12", "train.eval_every=6",
            "train.checkpoint_every=6", "train.batch_size=4", "train.context_bytes=64", "train.log_every=3",
            "model.max_positions=64"]
    command = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
               "--runtime-env-json", json.dumps(runtime_env), "--",
               "python", "-m", "pipelines.train", "--config", "pipelines/configs/tiny-cpu.json"]
    for item in sets:
        command += ["--set", item]
    deadline = time.time() + 90
    while True:  # the dashboard answers before its job agent is up; Ray says "try again later"
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=360, cwd=REPO)
        if "No available agent" not in done.stderr + done.stdout or time.time() > deadline:
            break
        time.sleep(2)
    assert done.returncode == 0, f"job failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    assert "succeeded" in done.stdout
    # the job's log: each evaluation printed once, without Ray Train's per-report INFO dump
    log = done.stdout + done.stderr
    assert log.count("step 6: val/bpb") == 1, log[-4000:]
    assert "Reporting training result" not in log

    import mlflow

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("jobs")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "12" and run.data.params["run.num_workers"] == "1"
    assert {"val/bpb", "train/loss", "bits_per_s"} <= set(run.data.metrics)
    mlflow.set_tracking_uri(uri)
    (logged,) = mlflow.search_logged_models(experiment_ids=[experiment.experiment_id], output_format="list")
    texts = mlflow.pyfunc.load_model(logged.model_uri).predict(["So shaken"])
    assert texts[0].startswith("So shaken") and len(texts[0]) > len("So shaken")
