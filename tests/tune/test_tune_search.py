"""Ray Tune searches on the session's local Ray: ASHA, MLflow parent/children, best config, restore, refusals.

Every search here replaces the space's learning rate by the grid train.lr = [3e-3, 3e-3, 1e-6, 1e-6]
(one sample: four trials, in that order), two at a time. The 1e-6 trials cannot move the model
in 8 steps, so they are clearly worse at the first rung; they start only when a 3e-3 trial has
ended, and reach the rung a whole trial start-up after both 3e-3 trials did, so ASHA (grace 1,
reduction 2: stop what is worse than the median so far) stops each of them there, whichever of
the two concurrent trials reports first. Two at a time because a trial is mostly Ray Train's
start-up (new controller and worker processes), which leaves a core idle at one at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from bitlm.cli import main as cli
from bitlm.config import ModelConfig, TrainConfig, from_dict
from pipelines.train import PipelineConfig, RayRunConfig
from tune import search as tune_search
from tune.search import SearchConfig, run_search
from tune.spaces import NAMED

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

WORSE_LR = {"train.lr": {"grid": [3e-3, 3e-3, 1e-6, 1e-6]}}
RAY_BOOKKEEPING = {"pid", "hostname", "node_ip", "time_this_iter_s", "time_total_s", "timestamp",
                   "training_iteration", "iterations_since_restore", "time_since_restore", "done"}


def base_config(corpus_dir: Path, storage: Path, eval_every: int = 8) -> PipelineConfig:
    return PipelineConfig(
        model=ModelConfig.from_name("tiny", kind="patched", max_positions=64),
        train=TrainConfig(batch_size=4, context_bytes=32, max_steps=3 * eval_every, warmup_steps=2, log_every=4,
                          eval_every=eval_every, eval_batches=2, lr=3e-3, precision="fp32"),
        run=RayRunConfig(name="base", experiment="tune-tests", storage_path=str(storage / "ray"), data=str(corpus_dir),
                         num_workers=1, cpus_per_worker=0.5))


# The diffusion ELBO of an untrained model depends on the noise schedule (6.7 bpb for `exp`, 9.0 for
# `linear` here), and a 3e-3 trial with 50 warm-up steps has barely moved by step 8; at step 24
# every 3e-3 trial seen was below 6.1 and so below every untrained one, whatever their schedules.
EVAL_EVERY = {"diffusion": 24}


def search_config(space_name: str, corpus_dir: Path, storage: Path, **kw) -> SearchConfig:
    # trial driver 0.5 CPU + one worker at 0.5: two trials at a time on the 2-CPU session Ray
    base = base_config(corpus_dir, storage, EVAL_EVERY.get(space_name, 8))
    return SearchConfig(space=NAMED[space_name].with_params(WORSE_LR), base=base,
                        num_samples=1, grace_period=1, reduction_factor=2, max_t=3, trial_cpus=0.5, max_concurrent=2,
                        storage_path=str(storage / "tune"), n_probes=4, **kw)


def children(client: MlflowClient, parent_run_id: str):
    experiment = client.get_experiment_by_name("tune-tests")
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")


@pytest.fixture(scope="module")
def diffusion_search(ray_local, corpus_dir, tracking, tmp_path_factory):
    lines: list[str] = []
    outcome = run_search(search_config("diffusion", corpus_dir, tmp_path_factory.mktemp("diffusion")),
                         echo=lines.append)
    return outcome, lines


SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared/data/tinyshakespeare.txt"


def test_a_diffusion_search_runs_four_trials_and_asha_stops_one_early(diffusion_search):
    if not SHAKESPEARE.is_file():
        # on the stand-in's 5 kB of repeated pangrams the diffusion trials' first ELBOs are too close
        # for the rung to single out the lr-1e-6 trials (a clean clone without ../shared: one 3e-3 stopped)
        pytest.skip(f"tinyshakespeare not found at {SHAKESPEARE} (the shared/ folder beside the repo root)")
    outcome, _ = diffusion_search
    assert len(outcome.rows) == 4 and not outcome.interrupted
    assert all(r["status"] in ("finished", "stopped early") for r in outcome.rows), outcome.rows
    # a 3e-3 trial may be stopped too (by the other, when it reports second and worse): that is ASHA's call
    assert all(r["status"] == "stopped early" for r in outcome.rows if r["train.lr"] == 1e-6), outcome.rows
    assert all(r["n_evals"] == 3 for r in outcome.rows if r["status"] == "finished")
    assert outcome.best["train.lr"] == 3e-3 and outcome.best["val/elbo_bpb"] == outcome.best["objective"]


def test_the_progress_view_prints_one_line_per_trial_event(diffusion_search):
    _, lines = diffusion_search
    assert lines[0].startswith("concurrency: 2 trial(s) at a time, as asked")
    assert sum(" started " in line for line in lines) == 4
    assert sum(" eval " in line and " objective " in line for line in lines) >= 4 + 2
    assert not any("Trial status" in line or "╭" in line for line in lines)
    assert any(line.startswith("train it: bitlm train --config ") for line in lines)


def test_the_parent_run_has_four_children_with_the_searched_params_and_no_ray_metrics(diffusion_search, tracking):
    outcome, _ = diffusion_search
    runs = children(tracking, outcome.parent_run_id)
    assert len(runs) == 4
    for run in runs:
        params, metrics = run.data.params, run.data.metrics
        for key in NAMED["diffusion"].params:
            assert key in params, key
        assert params["model.causal"] == "false" and "train.batch_size" in params  # the full flattened config
        assert "val/elbo_bpb" in metrics and "objective" in metrics
        assert not set(metrics) & RAY_BOOKKEEPING
        history = tracking.get_metric_history(run.info.run_id, "val/elbo_bpb")
        # every evaluation's step; a stopped trial may log one more before its abort lands
        steps = sorted(m.step for m in history)
        assert steps and steps == [24, 48, 72][:len(steps)], steps
    best = [r for r in runs if r.data.tags.get("bitlm.tune.best") == "true"]
    assert [r.info.run_id for r in best] == [outcome.best["mlflow_run_id"]]


def test_the_parent_run_holds_the_table_the_best_config_and_the_plot(diffusion_search, tracking):
    outcome, _ = diffusion_search
    names = {a.path for a in tracking.list_artifacts(outcome.parent_run_id)}
    assert {"results.csv", "best_config.json", "objective_vs_params.png", "space.json"} <= names
    assert outcome.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = outcome.csv_path.read_text().splitlines()[0].split(",")
    assert {"trial_id", "status", "objective", "diffusion.noise_schedule", "train.lr"} <= set(header)


def test_the_best_config_loads_into_pipeline_config_and_trains(diffusion_search, corpus_dir, tmp_path, tracking):
    outcome, _ = diffusion_search
    cfg = from_dict(PipelineConfig, json.loads(outcome.best_config_path.read_text()))
    assert cfg.model.causal is False and cfg.train.lr == 3e-3
    # in this process: the trials already trained this config on Ray, and `bitlm train --config` on Ray
    # runs in tests/pipelines/test_job_submit.py (a second Ray run here would cost ~10 s of the budget)
    out = tmp_path / "best"
    result = CliRunner().invoke(cli, ["train", "--local", "--config", str(outcome.best_config_path), "--data",
                                      str(corpus_dir), "--out", str(out), "--steps", "8"])
    assert result.exit_code == 0, result.output
    assert (out / "model" / "model.safetensors").is_file()
    assert from_dict(ModelConfig, json.loads((out / "model" / "config.json").read_text())["model"]) == cfg.model


def test_a_telemetry_search_reports_the_gate_rates_and_stops_one_trial_early(ray_local, corpus_dir, tracking,
                                                                              tmp_path):
    outcome = run_search(search_config("telemetry", corpus_dir, tmp_path), echo=lambda line: None)
    assert len(outcome.rows) == 4
    # untrained: ~9 bpb; a 3e-3 trial ~5.6 at step 8, and the gate's rates (which depend on the
    # floors and burn-in alone) add at most ~2.2 in this space (BENCHMARKS.md, bench_gate_floors)
    assert all(r["status"] == "stopped early" for r in outcome.rows if r["train.lr"] == 1e-6), outcome.rows
    for row in outcome.rows:
        rates = [row[k] for k in ("gate/false_block_rate", "gate/loop_miss_rate", "gate/random_miss_rate")]
        assert all(0.0 <= v <= 1.0 for v in rates)
        assert row["objective"] == pytest.approx(row["val/bpb"] + sum(rates))
    best = from_dict(PipelineConfig, json.loads(outcome.best_config_path.read_text()))
    assert best.safety.c_floor == outcome.best["safety.c_floor"] and best.safety.burn_in == outcome.best["safety.burn_in"]
    runs = children(tracking, outcome.parent_run_id)
    assert len(runs) == 4 and all("safety.c_floor" in r.data.params for r in runs)
    assert all("gate/false_block_rate" in r.data.metrics for r in runs)


def test_a_search_stopped_after_two_trials_resumes_without_repeats_or_duplicate_children(ray_local, corpus_dir,
                                                                                        tracking, tmp_path):
    first_lines: list[str] = []
    first = run_search(search_config("representation", corpus_dir, tmp_path, search="random", stop_after=2),
                       echo=first_lines.append)
    assert first.interrupted
    # no third trial was started only to be interrupted (and waited for) when the session stopped
    assert sum(" started " in line for line in first_lines) == 2, first_lines
    done_before = {r["trial_id"]: r for r in first.rows if r["status"] in ("finished", "stopped early")}
    assert len(done_before) == 2
    histories = {r["trial_id"]: len(tracking.get_metric_history(r["mlflow_run_id"], "val/bpb"))
                 for r in done_before.values()}
    lines: list[str] = []
    second = run_search(search_config("representation", corpus_dir, tmp_path, search="random"), resume=True,
                        echo=lines.append)
    assert not second.interrupted and len(second.rows) == 4
    assert not any(f"{trial_id} started" in line for line in lines for trial_id in done_before)
    for trial_id, n in histories.items():  # a finished trial was not trained again
        row = next(r for r in second.rows if r["trial_id"] == trial_id)
        assert len(tracking.get_metric_history(row["mlflow_run_id"], "val/bpb")) == n
    runs = children(tracking, second.parent_run_id)
    assert second.parent_run_id == first.parent_run_id
    assert len(runs) == 4 and len({r.data.tags["bitlm.tune.trial_id"] for r in runs}) == 4
    # the 1e-6 trials ran after the restore, against the rungs the first session recorded
    assert all(r["status"] == "stopped early" for r in second.rows if r["train.lr"] == 1e-6), second.rows
    other = search_config("diffusion", corpus_dir, tmp_path, name="representation")
    with pytest.raises(ValueError, match="started with another space"):
        run_search(other, resume=True, echo=lambda line: None)


def test_bitlm_tune_help_explains_each_space():
    result = CliRunner().invoke(cli, ["tune", "--help"])
    assert result.exit_code == 0
    for name, space in NAMED.items():
        assert f"{name}: " in result.output
        for key in space.params:
            assert key in result.output


INVALID = {
    "unknown key": ({"train.nonsense": {"choice": [1, 2]}}, "train.nonsense"),
    "empty choice": ({"diffusion.noise_schedule": {"choice": []}}, "diffusion.noise_schedule"),
    "low above high": ({"train.lr": {"uniform": [0.01, 0.001]}}, "train.lr"),
    "log range from 0": ({"train.lr": {"loguniform": [0.0, 0.01]}}, "train.lr"),
    "value the config refuses": ({"diffusion.steps": {"int": [0, 8]}}, "diffusion.steps"),
    "choice the config refuses": ({"diffusion.noise_schedule": {"choice": ["cosine", "square"]}},
                                  "diffusion.noise_schedule"),
    "gate floor out of range": ({"safety.c_floor": {"uniform": [0.2, 1.5]}}, "safety.c_floor"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_an_invalid_space_is_refused_before_any_trial_naming_the_key(case, corpus_dir, tmp_path, monkeypatch):
    params, key = INVALID[case]
    monkeypatch.setattr(tune_search, "run_search", lambda *a, **k: pytest.fail("the search started"))
    space_file = tmp_path / "space.json"
    space_file.write_text(json.dumps({"name": "bad", "params": params}))
    result = CliRunner().invoke(cli, ["tune", "--space", str(space_file), "--data", str(corpus_dir), "--preset", "tiny",
                                      "--storage", str(tmp_path / "tune")])
    assert result.exit_code != 0
    assert key in result.output, result.output
    assert not (tmp_path / "tune").exists()
