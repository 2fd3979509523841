"""Hostile and careless inputs to `bitlm train` on Ray: the cluster it joins, its run directory, its corpus (issue 10)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from bitlm.cli import main
from bitlm.data import prepare_corpus
from pipelines import train as pipeline

TEXT = b"the quick brown fox jumps over the lazy dog. " * 80 + b"pack my box with five dozen liquor jugs! " * 80
# one worker, an evaluation and a checkpoint at the end
FAST = ("--preset", "tiny", "--workers", "1", "--set", "train.context_bytes=32",
        "--set", "train.batch_size=4", "--set", "train.eval_every=2", "--set", "train.eval_batches=1",
        "--set", "run.experiment=tests-hostile")


def make_corpus(root: Path, text: bytes) -> Path:
    root.mkdir(parents=True)
    (root / "source.txt").write_bytes(text)
    prepare_corpus([root / "source.txt"], root / "data", window_bytes=256, progress=False)
    return root / "data"


def test_ray_address_is_a_new_local_ray_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert pipeline.ray_address(None) == "local"
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert pipeline.ray_address(None) == "ray://head:10001"
    assert pipeline.ray_address("auto") == "auto"


def test_run_training_passes_local_to_ray_init_without_an_address(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(pipeline, "train_driver", lambda cfg: "trained")
    assert pipeline.run_training(pipeline.PipelineConfig()) == "trained"
    assert calls[0]["address"] == "local" and calls[0]["dashboard_host"] == "127.0.0.1"


# ----------------------------------------------------------------------------------------------
# with the session's Ray


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("ray-hostile") / "a", TEXT)


@pytest.fixture(scope="module")
def ray_run(ray_local, tracking, corpus_dir, tmp_path_factory) -> Path:
    """A finished two-step Ray run of ours."""
    out = tmp_path_factory.mktemp("ray-runs") / "r1"
    result = CliRunner().invoke(main, ["train", "--data", str(corpus_dir), "--out", str(out), *FAST, "--steps", "2"])
    assert result.exit_code == 0, result.output
    return out


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_ray_resume_on_another_corpus_is_refused_before_training(ray_run, tmp_path):
    other = make_corpus(tmp_path / "b", TEXT[::-1])
    before = listing(ray_run)
    result = CliRunner().invoke(main, ["train", "--data", str(other), "--out", str(ray_run), *FAST,
                                       "--steps", "4"])
    assert result.exit_code == 2, result.output
    assert "different corpus" in result.output and "--no-resume" in result.output
    assert listing(ray_run) == before


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_shard_edited_in_place_is_refused_by_the_ray_driver(ray_local, tracking, corpus_dir, tmp_path):
    data = Path(shutil.copytree(corpus_dir, tmp_path / "data"))
    shard = data / "train-00000.parquet"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    result = CliRunner().invoke(main, ["train", "--data", str(data), "--out", str(tmp_path / "run"), *FAST,
                                       "--steps", "2"])
    assert result.exit_code == 2, result.output
    assert "train-00000.parquet" in result.output and "sha256" in result.output
    assert not list((tmp_path / "run").glob("step-*"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_fresh_ray_run_starts_over_and_keeps_its_neighbours(ray_run, corpus_dir):
    earlier_id = (ray_run / "mlflow_run_id").read_text()
    (ray_run.parent / "neighbour.txt").write_text("kept\n")
    result = CliRunner().invoke(main, ["train", "--data", str(corpus_dir), "--out", str(ray_run), "--no-resume",
                                       *FAST, "--steps", "1"])
    assert result.exit_code == 0, result.output
    assert "done: step 1;" in result.output  # not resumed from the earlier run's step 2
    assert sorted(p.name for p in ray_run.glob("step-*")) == ["step-00000001"]
    assert (ray_run / "mlflow_run_id").read_text() != earlier_id  # a new MLflow run, too
    assert (ray_run.parent / "neighbour.txt").read_text() == "kept\n"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_diverging_ray_run_ends_in_one_line_naming_the_step(ray_local, tracking, corpus_dir, tmp_path):
    # the worker's NonFiniteLossError must survive Ray's pickling (it once lost its fields on the way)
    result = CliRunner().invoke(main, ["train", "--data", str(corpus_dir), "--out", str(tmp_path / "run"), *FAST,
                                       "--steps", "6", "--set", "train.lr=1e30", "--set", "train.checkpoint_every=1"])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "training failed on worker 0: training step" in errors[0], result.output
    assert "nan" in errors[0] or "inf" in errors[0]
    assert "Traceback" not in result.output


def test_failure_text_names_the_workers_own_error():
    import pickle

    from ray.train import WorkerGroupError

    from bitlm.engine import NonFiniteLossError

    error = pickle.loads(pickle.dumps(WorkerGroupError("Training failed", {0: NonFiniteLossError(7, "the loss is nan", None)})))
    assert pipeline.failure_text(error).startswith("training failed on worker 0: training step 7: the loss is nan;")
