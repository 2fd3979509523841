"""Distillation on Ray Train: the student is logged and registered as models:/<name>@distilled, loaded and served."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from bitlm import checkpoint as ckpt
from bitlm.config import ModelConfig, TrainConfig
from bitlm.data import Corpus, prepare_corpus
from bitlm.distill import DistillConfig, read_metrics
from bitlm.engine import fit
from bitlm.model import BitTransformerLM
from pipelines.distill import DistillJob, run_distill, teacher_run_id
from pipelines.train import RayRunConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared/data/tinyshakespeare.txt"
TEXT = (b"the quick brown fox jumps over the lazy dog. " * 60 + b"pack my box with five dozen liquor jugs! " * 60)
TEACHER = ModelConfig.from_name("tiny", kind="patched", max_positions=64)
STUDENT = dataclasses.replace(TEACHER, d_model=32, d_ff=128)
TRAIN = TrainConfig(batch_size=4, context_bytes=32, max_steps=8, warmup_steps=2, log_every=4, eval_every=8,
                    eval_batches=2, lr=3e-3, precision="fp32")
NAME = "bitlm-distill-tests"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A corpus and a briefly trained teacher under one directory (the allowed root, the MLflow store's home)."""
    root = tmp_path_factory.mktemp("distill")
    source = root / "source.txt"
    source.write_bytes(SHAKESPEARE.read_bytes()[:40_000] if SHAKESPEARE.is_file() else TEXT * 3)
    prepare_corpus([source], root / "data", window_bytes=128, progress=False)
    torch.manual_seed(0)
    teacher = BitTransformerLM(TEACHER)
    fit(teacher, Corpus.open(root / "data"), dataclasses.replace(TRAIN, max_steps=40))
    ckpt.save_pretrained(teacher, root / "teacher")
    return root


@pytest.fixture(scope="module")
def distilled(ray_local, workspace):
    """One Ray distillation job (2 workers, DDP, one round: no floors), tracked in a store of its own."""
    import mlflow

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow.db'}")
        mp.setenv("BITLM_SERVE_CACHE", str(workspace / "cache"))
        mp.chdir(workspace)  # the runs' artifacts go to ./mlruns beside the store
        run = RayRunConfig(name="student", experiment="tests", storage_path=str(workspace / "ray"),
                           data=str(workspace / "data"), num_workers=2, cpus_per_worker=1.0)
        job = DistillJob(teacher=str(workspace / "teacher"), teacher_dir=str(workspace / "teacher"), student=STUDENT,
                         floors={}, out=str(workspace / "student"), register=NAME, train=TRAIN, run=run,
                         distill=DistillConfig(k=2, per_cluster=2, n_samples=1, sample_bytes=16))
        try:
            yield (*run_distill(job), workspace)
        finally:
            mlflow.set_tracking_uri(None)


def test_the_job_registers_a_student_that_pyfunc_loads_and_runs(distilled):
    import mlflow

    result, metrics, out, model_uri = distilled[:4]
    assert metrics["n_rounds"] == 1 and result.met
    assert read_metrics(out)["achieved"] == pytest.approx(metrics["achieved"])
    assert metrics["student"]["n_parameters"] < metrics["teacher"]["n_parameters"]
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@distilled")
    texts = model.predict(["ROMEO:"], params={"max_new_bytes": 8, "seed": 1})
    assert len(texts) == 1 and texts[0].startswith("ROMEO:") and len(texts[0].encode()) >= len("ROMEO:")


def test_the_run_holds_metrics_json_and_names_the_teacher(distilled):
    from mlflow import MlflowClient

    result, metrics, out, model_uri, workspace = distilled
    client = MlflowClient()
    version = client.get_model_version_by_alias(NAME, "distilled")
    run = client.get_run(version.run_id)
    assert run.data.tags["bitlm.teacher"] == str(workspace / "teacher") and run.info.status == "FINISHED"
    assert run.data.metrics["student/val_bpb"] == pytest.approx(result.achieved["val_bpb"])
    assert "val/bpb" in run.data.metrics  # the workers' evaluations, logged by rank 0
    logged = client.download_artifacts(run.info.run_id, "metrics.json", str(workspace / "dl"))
    assert Path(logged).read_text() and '"n_rounds": 1' in Path(logged).read_text()


def test_serve_serves_the_registered_student(distilled):
    import requests
    from ray import serve

    from serve.app import build_app
    from tests.conftest import free_port, wait_for

    workspace = distilled[-1]
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"model": f"models:/{NAME}@distilled", "allowed_roots": [str(workspace)], "num_cpus": 0.5,
                             "audit_log": str(workspace / "audit.jsonl")}), name="distilled", route_prefix="/",
                  blocking=False)
        wait_for(f"http://127.0.0.1:{port}/healthz", 60)
        r = requests.post(f"http://127.0.0.1:{port}/v1/generate", json={"prompt": "ROMEO:", "max_new_bytes": 4,
                                                                          "c_floor": 0.0, "s_floor": 0.0}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["text"].startswith("ROMEO:")
    finally:
        serve.shutdown()


def test_teacher_run_id_comes_from_the_uri_or_the_downloaded_mlmodel(tmp_path):
    assert teacher_run_id("runs:/0123abcd/model", tmp_path) == "0123abcd"
    (tmp_path / "artifacts" / "model").mkdir(parents=True)
    (tmp_path / "MLmodel").write_text("artifact_path: model\nrun_id: feedbeef\n")
    assert teacher_run_id("models:/t@champion", tmp_path / "artifacts" / "model") == "feedbeef"
    assert teacher_run_id(str(tmp_path), tmp_path) is None
