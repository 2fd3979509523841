"""Ray Train pipeline on a local Ray: DDP, FSDP2 and pipeline strategies, failures, scaling, MLflow."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from bitlm import checkpoint as ckpt
from bitlm.config import ModelConfig, ParallelConfig, ScalingConfig, TrainConfig, from_dict
from bitlm.data import Corpus
from bitlm.engine import evaluate, fit
from bitlm.model import BitTransformerLM
from bitlm.rundir import run_safety_config
from pipelines.train import PipelineConfig, RayRunConfig, load_config, train_driver

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MODEL = ModelConfig.from_name("tiny", kind="patched", n_layers=2, max_positions=64)
TRAIN = TrainConfig(batch_size=4, context_bytes=32, max_steps=16, warmup_steps=2, log_every=4, eval_every=8,
                    eval_batches=2, checkpoint_every=8, lr=3e-3, precision="fp32")
CURVE_TOLERANCE = 2e-3  # val bpb of a 2-worker run vs one worker on the same global batch (float reduction order)


def config(corpus_dir, tmp_path, name, strategy="ddp", n_microbatches=4, **run) -> PipelineConfig:
    return PipelineConfig(model=MODEL, train=TRAIN,
                          parallel=ParallelConfig(strategy=strategy, n_microbatches=n_microbatches),
                          run=RayRunConfig(name=name, experiment="tests", storage_path=str(tmp_path / "ray"),
                                           data=str(corpus_dir), num_workers=2, cpus_per_worker=1.0, **run))


def single_process_reference(corpus_dir, batch_size: int):
    """The same run in this process with the global batch: what DDP and FSDP must reproduce."""
    torch.manual_seed(TRAIN.seed)
    model = BitTransformerLM(MODEL)
    cfg = dataclasses.replace(TRAIN, batch_size=batch_size)
    return fit(model, Corpus.open(corpus_dir), cfg)


@pytest.fixture(scope="module")
def reference(corpus_dir) -> list[float]:
    """The reference's val bpb curve (every evaluation)."""
    result = single_process_reference(corpus_dir, 2 * TRAIN.batch_size)
    assert result.history[0]["val/bpb"] > result.metrics["val/bpb"]  # it learned
    return [h["val/bpb"] for h in result.history]


def val_curve(client: MlflowClient, name: str) -> list[float]:
    history = client.get_metric_history(run_metrics(client, name).info.run_id, "val/bpb")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


@pytest.fixture(scope="module")
def ddp_run(ray_local, corpus_dir, tracking, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    return train_driver(config(corpus_dir, tmp, "ddp", strategy="ddp")), tmp


def run_metrics(client: MlflowClient, name: str) -> dict:
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                              filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, f"expected one MLflow run named {name}, found {len(runs)}"
    return runs[0]


def test_ddp_two_workers_reproduce_one_worker_on_the_same_global_batch(ddp_run, reference, tracking):
    result, _ = ddp_run
    assert result.metrics["step"] == TRAIN.max_steps
    assert val_curve(tracking, "ddp") == pytest.approx(reference, abs=CURVE_TOLERANCE)


def test_the_mlflow_run_holds_params_metrics_and_a_loadable_model(ddp_run, tracking):
    import mlflow

    run = run_metrics(tracking, "ddp")
    assert run.info.status == "FINISHED"
    assert run.data.params["parallel.strategy"] == "ddp" and run.data.params["model.arch"] == "patched"
    for key in ("train/loss", "val/bpb", "val/K", "val/C", "val/S", "bits_per_s", "bits_seen", "lr",
                "model/n_parameters"):
        assert key in run.data.metrics, key
    losses = [m.value for m in tracking.get_metric_history(run.info.run_id, "train/loss")]
    assert len(losses) == TRAIN.max_steps // TRAIN.log_every
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run.info.run_id}'", output_format="list")
    assert len(models) == 1
    texts = mlflow.pyfunc.load_model(models[0].model_uri).predict(["To be"])
    assert isinstance(texts[0], str) and len(texts[0]) > 0


def test_fsdp_matches_one_worker_and_its_checkpoint_loads_into_one_process(ray_local, corpus_dir, tracking,
                                                                            reference, tmp_path):
    result = train_driver(config(corpus_dir, tmp_path, "fsdp", strategy="fsdp"))
    assert val_curve(tracking, "fsdp") == pytest.approx(reference, abs=CURVE_TOLERANCE)
    with result.checkpoint.as_directory() as directory:
        model = ckpt.from_pretrained(directory)
    corpus = Corpus.open(corpus_dir)
    # the single-process model scores the validation set exactly as the sharded one did
    global_batch = dataclasses.replace(TRAIN, batch_size=2 * TRAIN.batch_size)
    assert evaluate(model, corpus, global_batch)["val/bpb"] == pytest.approx(result.metrics["val/bpb"], abs=1e-5)


def test_pipeline_strategy_trains_on_two_stages(ray_local, corpus_dir, tracking, tmp_path):
    cfg = config(corpus_dir, tmp_path, "pipeline", strategy="pipeline", n_microbatches=2)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(TRAIN, max_steps=24))
    result = train_driver(cfg)
    history = [m.value for m in MlflowClient().get_metric_history(run_metrics(tracking, "pipeline").info.run_id,
                                                                  "val/bpb")]
    assert result.metrics["step"] == 24
    assert history[-1] < history[0]


def test_an_injected_worker_failure_resumes_from_the_last_checkpoint(ray_local, corpus_dir, tracking, tmp_path,
                                                                     ddp_run):
    cfg = config(corpus_dir, tmp_path, "failure", strategy="ddp", max_failures=1, fail_at_step=12)
    result = train_driver(cfg)
    assert (tmp_path / "ray" / "failure" / "injected-failure").exists()
    straight, _ = ddp_run
    assert result.metrics["step"] == straight.metrics["step"] == TRAIN.max_steps
    # resumed at step 8 with the same data order, optimizer and RNG: the same final model
    assert result.metrics["val/bpb"] == pytest.approx(straight.metrics["val/bpb"], abs=1e-4)


def test_progressive_scaling_expands_twice_with_unchanged_logits_and_logs_events(ray_local, corpus_dir, tracking,
                                                                              tmp_path):
    cfg = config(corpus_dir, tmp_path, "scaling", strategy="fsdp")  # growth re-shards the model
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(TRAIN, max_steps=28, eval_every=4),
                              scaling=ScalingConfig(enabled=True, window=1, improve_thresh=10.0, rewarm_steps=4))
    result = train_driver(cfg)
    run = run_metrics(tracking, "scaling")
    client = MlflowClient()
    expansions = client.get_metric_history(run.info.run_id, "scaling/expansions")
    assert max(m.value for m in expansions) >= 2
    changes = [m.value for m in client.get_metric_history(run.info.run_id, "scaling/logit_change")]
    assert len(changes) >= 2 and max(changes) < 1e-4
    events = {k: v for k, v in run.data.tags.items() if k.startswith("scaling.event.")}
    assert len(events) >= 2 and '"kind": "depth"' in events["scaling.event.1"]
    with result.checkpoint.as_directory() as directory:
        grown = ckpt.read_config(directory)
    assert grown.n_layers == MODEL.n_layers + 1 and grown.d_ff == 2 * MODEL.d_ff


def test_configs_validate_and_load_from_json(tmp_path):
    with pytest.raises(ValueError, match="parallel.strategy"):
        ParallelConfig(strategy="zero3")
    with pytest.raises(ValueError, match="run.num_workers"):
        RayRunConfig(num_workers=0)
    example = Path(__file__).resolve().parents[2] / "pipelines/configs/tiny-cpu.json"
    cfg = load_config(example, ["run.num_workers=1", "train.lr=0.001"])
    assert cfg.run.num_workers == 1 and math.isclose(cfg.train.lr, 1e-3)
    with pytest.raises(ValueError, match="run.data"):
        train_driver(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, data="")))


def test_a_multi_node_run_survives_losing_a_node(corpus_dir, tmp_path):
    """Its own Ray cluster (head + 2 worker nodes), so it runs in a subprocess beside the session's Ray."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, RAY_ADDRESS="", RAY_USAGE_STATS_ENABLED="0", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")
    env.pop("RAY_ADDRESS")
    done = subprocess.run([sys.executable, "-m", "pipelines.drills", "node-loss", "--data", str(corpus_dir),
                           "--storage", str(tmp_path / "ray"), "--steps", "16"],
                          capture_output=True, text=True, timeout=280, env=env,
                          cwd=Path(__file__).resolve().parents[2])
    lines = [line for line in done.stdout.splitlines() if line.startswith("DRILL ")]
    assert lines, f"drill printed no result:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    out = json.loads(lines[-1][len("DRILL "):])
    assert out["error"] is None, out["error"]
    assert any("removed_node" in e for e in out["events"]), "no worker's node was removed"
    assert out["step"] == 16 and math.isfinite(out["val_bpb"])


def test_bitlm_train_runs_the_ray_driver_and_exports_the_model(ray_local, corpus_dir, tracking, tmp_path):
    from click.testing import CliRunner

    from bitlm.cli import main

    out = tmp_path / "runs" / "cli-run"
    result = CliRunner().invoke(main, [
        "train", "--data", str(corpus_dir), "--out", str(out), "--preset", "tiny", "--workers", "1",
        "--steps", "6", "--set", "train.context_bytes=32", "--set", "train.batch_size=4",
        "--set", "train.eval_every=6", "--set", "train.eval_batches=2", "--set", "run.experiment=tests",
        "--set", "safety.c_floor=0.25"])
    assert result.exit_code == 0, result.output
    assert "val bpb" in result.output
    assert ckpt.from_pretrained(out / "model").config.arch == "patched"
    assert run_metrics(tracking, "cli-run").data.params["run.num_workers"] == "1"
    # the whole experiment beside the model, as --local writes it: generate --safe and serve read its gate
    written = from_dict(PipelineConfig, json.loads((out / "config.json").read_text()))
    assert written.run.num_workers == 1 and written.train.max_steps == 6
    assert run_safety_config(out / "model") == (written.safety, out / "config.json")
    assert written.safety.c_floor == 0.25


def test_a_new_driver_with_the_same_name_and_storage_continues_the_run(ray_local, corpus_dir, tracking, tmp_path):
    first = config(corpus_dir, tmp_path, "driver-restart", strategy="ddp")
    first = dataclasses.replace(first, train=dataclasses.replace(TRAIN, max_steps=8))
    assert train_driver(first).metrics["step"] == 8
    # the driver is gone; a new one with a longer budget picks up the checkpoint of step 8
    second = dataclasses.replace(first, train=TRAIN)
    result = train_driver(second)
    assert result.metrics["step"] == TRAIN.max_steps
    run = run_metrics(tracking, "driver-restart")  # still one MLflow run
    steps = [m.step for m in tracking.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(TRAIN.log_every, TRAIN.max_steps + 1, TRAIN.log_every))
