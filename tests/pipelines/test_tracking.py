"""pipelines.tracking and `bitlm ui`: runs, metrics, scaling events and pyfunc models in a SQLite store."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

from bitlm.checkpoint import save_pretrained
from bitlm.cli import main
from bitlm.config import ModelConfig
from bitlm.model import BitTransformerLM
from pipelines.tracking import MAX_PARAM_CHARS, RunTracker, tracking_uri


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """A migrated, empty MLflow database; creating one costs ~6 s, copying it ~0 s."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(empty_store, tmp_path, monkeypatch):
    """This test's own store, as MLFLOW_TRACKING_URI; the process-wide URI is reset afterwards."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # artifacts of new experiments go to ./mlruns
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = BitTransformerLM(ModelConfig.from_name("tiny", kind="patched"))
    return save_pretrained(model, tmp_path_factory.mktemp("pretrained") / "model")


def _start(**kwargs) -> RunTracker:
    kwargs.setdefault("system_metrics", False)
    return RunTracker.start("tests", "run", kwargs.pop("params", {}), **kwargs)


def test_tracking_uri_defaults_to_sqlite_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_tracking_uri_follows_the_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/runs.db")
    assert tracking_uri() == "sqlite:////elsewhere/runs.db"


def test_a_run_holds_flattened_params_metrics_and_tags(store):
    params = {"model": {"d_model": 64, "kind": "patched", "widths": [1, 2]}, "lr": 3e-4,
              "note": "x" * (MAX_PARAM_CHARS + 10), "many": {f"p{i}": i for i in range(150)}}
    tracker = _start(params=params, tags={"preset": "tiny"})
    tracker.log_metrics({"train/loss": 2.5}, step=1)
    tracker.log_metrics({"train/loss": 2.0, "val/bits_per_byte": 1.5}, step=2)
    tracker.end()
    client = MlflowClient(store)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "run"
    assert run.data.params["model.d_model"] == "64"
    assert run.data.params["model.widths"] == "[1, 2]"
    assert run.data.params["lr"] == "0.0003"
    assert len(run.data.params["note"]) == MAX_PARAM_CHARS
    assert len([k for k in run.data.params if k.startswith("many.")]) == 150  # more than one batch
    assert run.data.tags["preset"] == "tiny"
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.5), (2, 2.0)]
    assert run.data.metrics["val/bits_per_byte"] == 1.5


def test_non_finite_and_non_numeric_metrics_are_dropped(store):
    tracker = _start()
    logged = tracker.log_metrics({"ok": 1.5, "tensor": torch.tensor(0.25), "nan": math.nan, "inf": math.inf,
                                  "text": "0.5", "flag": True, "vector": torch.ones(3)}, step=0)
    tracker.end()
    assert logged == {"ok": 1.5, "tensor": 0.25}
    assert MlflowClient(store).get_run(tracker.run_id).data.metrics == {"ok": 1.5, "tensor": 0.25}


def test_resuming_by_run_id_appends_to_the_same_run(store):
    first = _start(params={"lr": 0.1})
    first.log_metrics({"loss": 3.0}, step=1)
    first.end("FAILED")  # the worker died
    resumed = _start(params={"lr": 0.1}, run_id=first.run_id)
    assert resumed.run_id == first.run_id
    client = MlflowClient(store)
    assert client.get_run(first.run_id).info.status == "RUNNING"
    resumed.log_metrics({"loss": 2.0}, step=2)
    resumed.end()
    assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == [1, 2]
    assert len(client.search_runs([resumed.experiment_id])) == 1
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_an_error_inside_the_tracker_block_marks_the_run_failed(store):
    with pytest.raises(RuntimeError):
        with _start() as tracker:
            raise RuntimeError("worker lost")
    assert MlflowClient(store).get_run(tracker.run_id).info.status == "FAILED"


def test_log_dict_stores_a_json_artifact(store):
    tracker = _start()
    tracker.log_dict({"val/bits_per_byte": 1.25, "step": 40}, "metrics.json")
    tracker.end()
    assert mlflow.artifacts.load_dict(f"runs:/{tracker.run_id}/metrics.json") == {"val/bits_per_byte": 1.25,
                                                                                   "step": 40}


def test_log_event_counts_expansions_and_records_each_as_a_tag(store):
    tracker = _start()
    assert tracker.log_event("width", 10, d_model=128) == 1
    assert tracker.log_event("depth", 20, n_layers=4) == 2
    tracker.end()
    resumed = _start(run_id=tracker.run_id)
    assert resumed.log_event("width", 30, d_model=256) == 3  # numbering continues after a restart
    resumed.end()
    client = MlflowClient(store)
    expansions = client.get_metric_history(tracker.run_id, "scaling/expansions")
    assert [(m.step, m.value) for m in expansions] == [(10, 1.0), (20, 2.0), (30, 3.0)]
    assert [m.value for m in client.get_metric_history(tracker.run_id, "scaling/width")] == [1.0, 2.0]
    tags = client.get_run(tracker.run_id).data.tags
    assert json.loads(tags["scaling.event.2"]) == {"kind": "depth", "step": 20, "details": {"n_layers": 4}}
    assert json.loads(tags["scaling.event.3"])["details"] == {"d_model": 256}


def test_system_metrics_are_sampled_while_the_run_is_open(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    tracker = _start(system_metrics=True)
    client = MlflowClient(store)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        system = [k for k in client.get_run(tracker.run_id).data.metrics if k.startswith("system/")]
        if system:
            break
        time.sleep(0.2)
    tracker.end()
    assert "system/cpu_utilization_percentage" in system


def test_logged_model_is_safetensors_and_predicts_deterministically(store, model_dir, tmp_path):
    tracker = _start(params={"lr": 0.1})
    uri = tracker.log_model(model_dir)
    tracker.end()
    assert uri.startswith("models:/m-")
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "download")))
    files = {p.name for p in local.rglob("*") if p.is_file()}
    assert {"model.safetensors", "config.json", "MLmodel"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pt", ".pth", ".bin", ".ckpt"))]
    model = mlflow.pyfunc.load_model(uri)
    eight = {"max_new_bytes": 8}
    texts = model.predict(["To be", "Or"], params=eight)
    assert len(texts) == 2 and texts[0].startswith("To be") and texts[1].startswith("Or")
    assert model.predict(["To be", "Or"], params=eight) == texts
    assert model.predict("To be", params=eight) == texts[:1]
    assert model.predict(["To be"], params={**eight, "seed": 1}) != texts[:1]
    frame = pd.DataFrame({"prompt": ["To be", "Or"], "max_new_bytes": [2, 8]})
    short, same = model.predict(frame)
    assert len(short) <= len("To be") + 2 < len(texts[0])
    assert same == texts[1]


def test_registered_alias_loads_in_a_fresh_process(store, model_dir):
    tracker = _start()
    with pytest.raises(ValueError, match="registered_name"):
        tracker.log_model(model_dir, alias="champion")
    uri = tracker.log_model(model_dir, registered_name="bitlm-tiny", alias="champion")
    tracker.end()
    expected = mlflow.pyfunc.load_model(uri).predict(["To be"], params={"max_new_bytes": 8})
    code = ("import json, mlflow; m = mlflow.pyfunc.load_model('models:/bitlm-tiny@champion'); "
            "print(json.dumps(m.predict(['To be'], params={'max_new_bytes': 8})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MLFLOW_TRACKING_URI": store})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == expected


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ui_serves_the_same_store_on_loopback(store):
    MlflowClient(store).create_experiment("seen-by-the-ui")
    port = _free_port()
    command = [sys.executable, "-c", "from bitlm.cli import main; main()", "ui", "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, status = time.monotonic() + 60, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"{base}/", timeout=2) as response:
                    status = response.status
                break
            except OSError:
                time.sleep(0.3)
        assert status == 200
        query = f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=seen-by-the-ui"
        with urllib.request.urlopen(query, timeout=10) as response:
            assert json.load(response)["experiment"]["name"] == "seen-by-the-ui"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)  # the session we started: the server and its workers
            server.wait()


def test_ui_runs_one_worker_without_the_job_runner_and_warns_off_loopback(monkeypatch):
    calls = []
    monkeypatch.setattr("bitlm.cli.ui.os.execve", lambda path, argv, env: calls.append((argv, env)))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/x.db")
    result = CliRunner().invoke(main, ["ui", "--host", "0.0.0.0", "--port", "5123"])
    assert result.exit_code == 0, result.output
    argv, env = calls[0]
    assert argv[argv.index("--backend-store-uri") + 1] == "sqlite:////tmp/x.db"
    assert argv[argv.index("--workers") + 1] == "1"
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--port") + 1] == "5123"
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "not a loopback address" in result.output


def test_ui_help_names_the_loopback_default():
    result = CliRunner().invoke(main, ["ui", "--help"])
    assert result.exit_code == 0
    assert "127.0.0.1" in result.output
