"""Hostile and careless inputs to `bitlm train` / `bitlm demo` and to corpora: one-line errors, nothing lost (issue 10)."""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from bitlm.cli import main
from bitlm.config import ModelConfig
from bitlm.data import Corpus, prepare_corpus
from test_cli import FAST, prepare, train, train_steps, write_corpus


MARKER = ".bitlm-run"  # what a run of ours leaves in its directory


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def one_line_error(result) -> str:
    """The click error of a failed command: exit status 2, no traceback."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result.output


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile-corpus")
    assert prepare(write_corpus(root), root / "data").exit_code == 0
    return root / "data"


@pytest.fixture
def own_corpus(corpus_dir, tmp_path) -> Path:
    """A copy of the corpus this test may damage."""
    return Path(shutil.copytree(corpus_dir, tmp_path / "data"))


@pytest.fixture
def no_ray(monkeypatch):
    """The Ray path's training call fails the test: every refusal must come before Ray is reached."""
    reached = []

    def fake(cfg, address):
        reached.append(cfg)
        raise AssertionError("Ray was reached")

    monkeypatch.setattr("bitlm.cli.train.run_ray_training", fake)
    return reached


# ----------------------------------------------------------------------------------------------
# item 1: a fresh run removes only what a run of ours wrote


@pytest.fixture
def victim(corpus_dir, tmp_path) -> Path:
    """A directory holding a corpus and a file of the user's."""
    root = tmp_path / "victim"
    shutil.copytree(corpus_dir, root / "data")
    (root / "notes.txt").write_text("mine\n")
    return root


@pytest.mark.parametrize("local", [True, False], ids=["local", "ray"])
def test_an_out_that_contains_the_data_is_refused_and_nothing_is_deleted(victim, no_ray, local):
    before = listing(victim)
    result = run("train", *(["--local"] if local else []), "--data", str(victim / "data"), "--out", str(victim),
                 "--no-resume", "--preset", "tiny", "--steps", "1")
    message = one_line_error(result)
    assert str(victim) in message and "contains the data" in message
    assert listing(victim) == before and no_ray == []


@pytest.mark.parametrize("local", [True, False], ids=["local", "ray"])
def test_an_out_holding_files_of_the_user_is_refused_naming_one(corpus_dir, tmp_path, no_ray, local):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work\n")
    result = run("train", *(["--local"] if local else []), "--data", str(corpus_dir), "--out", str(out),
                 "--no-resume", *FAST[:2], "--steps", "1")
    message = one_line_error(result)
    assert "thesis.tex" in message
    assert (out / "thesis.tex").read_text() == "years of work\n" and listing(out) == ["thesis.tex"]


def test_an_out_that_is_the_working_directory_is_refused(corpus_dir, tmp_path, monkeypatch, no_ray):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = run("train", "--data", str(corpus_dir), "--out", ".", "--no-resume", "--preset", "tiny")
    assert "working directory" in one_line_error(result)


def test_an_out_that_contains_the_working_directory_is_refused(corpus_dir, tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    result = run("train", "--local", "--data", str(corpus_dir), "--out", str(tmp_path / "a"), *FAST, "--steps", "1")
    assert "working directory" in one_line_error(result)
    assert listing(tmp_path / "a") == ["b"]


def test_a_run_of_ours_with_a_file_added_by_the_user_is_not_cleared(corpus_dir, tmp_path):
    out = tmp_path / "run"
    assert train(corpus_dir, out, 1).exit_code == 0
    (out / "my-plot.png").write_bytes(b"\x89PNG")
    before = listing(out)
    message = one_line_error(run("train", "--local", "--data", str(corpus_dir), "--out", str(out), "--no-resume",
                                 *FAST, "--steps", "1"))
    assert "my-plot.png" in message
    assert listing(out) == before


def test_a_local_run_marks_its_directory_and_a_fresh_run_clears_only_its_files(corpus_dir, tmp_path):
    out = tmp_path / "run"
    assert train(corpus_dir, out, 2).exit_code == 0
    assert (out / MARKER).is_file()
    again = train(corpus_dir, out, 1, "--no-resume")
    assert again.exit_code == 0, again.output
    assert train_steps(out / "metrics.jsonl") == [1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"]


def test_a_fresh_ray_run_removes_the_previous_ray_runs_files_before_ray(corpus_dir, tmp_path, monkeypatch):
    out = tmp_path / "runs" / "r1"
    # the layout a Ray run leaves under <storage>/<name>
    for directory in ("step-00000002", "workers", "model"):
        (out / directory).mkdir(parents=True)
        (out / directory / "x.json").write_text("{}")
    for name in ("checkpoint_manager_snapshot.json", ".validate_storage_marker", "mlflow_run_id", MARKER,
                 "injected-failure"):
        (out / name).write_text("{}")
    (tmp_path / "runs" / "sibling.txt").write_text("kept\n")
    seen = []
    monkeypatch.setattr("bitlm.cli.train.run_ray_training", lambda cfg, address: seen.append(listing(out)) or 1 / 0)
    run("train", "--data", str(corpus_dir), "--out", str(out), "--no-resume", "--preset", "tiny", "--steps", "1")
    assert seen and seen[0] == [MARKER]
    assert (tmp_path / "runs" / "sibling.txt").read_text() == "kept\n"


def test_demo_refuses_a_run_directory_holding_files_of_the_user(corpus_dir, tmp_path, no_ray):
    out = tmp_path / "demo"
    shutil.copytree(corpus_dir, out / "data")
    (out / "run").mkdir()
    (out / "run" / "keep.me").write_text("mine\n")
    message = one_line_error(run("demo", "--out", str(out), "--minutes", "0.01"))
    assert "keep.me" in message
    assert (out / "run" / "keep.me").read_text() == "mine\n" and no_ray == []


# ----------------------------------------------------------------------------------------------
# item 6: shards are checked against the manifest


def tamper(shard: Path) -> None:
    """Flip one byte in the middle of the file: same size, different sha256."""
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


def test_corpus_open_verifies_shards_by_default(own_corpus):
    tamper(own_corpus / "train-00000.parquet")
    with pytest.raises(ValueError, match="train-00000.parquet.*sha256"):
        Corpus.open(own_corpus)
    assert Corpus.open(own_corpus, verify=False).train.n_windows > 0


def test_training_on_a_shard_edited_in_place_is_refused_naming_it(own_corpus, tmp_path):
    tamper(own_corpus / "val-00000.parquet")
    result = run("train", "--local", "--data", str(own_corpus), "--out", str(tmp_path / "run"), *FAST, "--steps", "1")
    message = one_line_error(result)
    assert "val-00000.parquet" in message and "--no-verify-data" in message
    assert not (tmp_path / "run").exists()


def test_no_verify_data_skips_the_check(own_corpus, tmp_path):
    tamper(own_corpus / "val-00000.parquet")  # inside a window's bytes: still a readable Parquet file
    result = train(own_corpus, tmp_path / "run", 1, "--no-verify-data")
    assert result.exit_code == 0, result.output


# ----------------------------------------------------------------------------------------------
# item 7: a seed gives one model


def weights(out: Path) -> bytes:
    return (out / "model" / "model.safetensors").read_bytes()


def test_the_same_seed_gives_bit_identical_weights_and_another_seed_does_not(corpus_dir, tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert train(corpus_dir, tmp_path / name, 1, "--set", f"train.seed={seed}").exit_code == 0
    assert weights(tmp_path / "a") == weights(tmp_path / "b")
    assert weights(tmp_path / "a") != weights(tmp_path / "c")


# ----------------------------------------------------------------------------------------------
# item 8: --scaling grows the model and saves the grown one

# a plateau is certain: every evaluation is a window, and no improvement reaches 1000 %
PLATEAU = ("--scaling", "--set", "scaling.window=1", "--set", "scaling.improve_thresh=10",
           "--set", "scaling.order=depth", "--set", "scaling.max_expansions=1", "--set", "train.eval_every=1")


def test_scaling_grows_the_model_and_saves_the_grown_one(corpus_dir, tmp_path):
    out = tmp_path / "run"
    result = train(corpus_dir, out, 3, *PLATEAU)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "model" / "config.json").read_text())["model"]
    assert saved["n_layers"] == ModelConfig.from_name("tiny").n_layers + 1


def test_a_grown_run_resumes_instead_of_being_refused_as_another_model(corpus_dir, tmp_path):
    out = tmp_path / "run"
    assert train(corpus_dir, out, 3, *PLATEAU).exit_code == 0
    resumed = train(corpus_dir, out, 4, *PLATEAU)
    assert resumed.exit_code == 0, resumed.output
    assert "done: 4 steps" in resumed.output


# ----------------------------------------------------------------------------------------------
# item 9: resuming needs the same corpus, and the log restarts at the resumed step


def test_resuming_on_a_replaced_corpus_is_refused_saying_how_to_proceed(own_corpus, tmp_path):
    out = tmp_path / "run"
    assert train(own_corpus, out, 2).exit_code == 0
    before = (out / "metrics.jsonl").read_text()
    prepare_corpus([write_corpus(tmp_path / "other", seed=1)], own_corpus, window_bytes=64, progress=False)
    message = one_line_error(train_raw(own_corpus, out, 4))
    assert "different corpus" in message and "--no-resume" in message
    assert (out / "metrics.jsonl").read_text() == before


def train_raw(data: Path, out: Path, steps: int, *extra: str):
    return run("train", "--local", "--data", str(data), "--out", str(out), "--steps", str(steps), *FAST, *extra)


def test_a_fresh_run_on_a_replaced_corpus_is_allowed(own_corpus, tmp_path):
    out = tmp_path / "run"
    assert train(own_corpus, out, 2).exit_code == 0
    prepare_corpus([write_corpus(tmp_path / "other", seed=1)], own_corpus, window_bytes=64, progress=False)
    assert train(own_corpus, out, 2, "--no-resume").exit_code == 0


def test_resuming_drops_the_log_records_after_the_resumed_checkpoint(corpus_dir, tmp_path):
    out = tmp_path / "run"
    assert train(corpus_dir, out, 3, "--set", "train.checkpoint_every=2", "--set", "train.keep_checkpoints=3").exit_code == 0
    shutil.rmtree(out / "checkpoints" / "step-00000003")  # killed after logging step 3, before its checkpoint
    resumed = train(corpus_dir, out, 4, "--set", "train.checkpoint_every=2", "--set", "train.keep_checkpoints=3")
    assert resumed.exit_code == 0, resumed.output
    assert train_steps(out / "metrics.jsonl") == [1, 2, 3, 4]


def test_a_damaged_newest_checkpoint_is_named_once_in_one_line_and_the_run_resumes(corpus_dir, tmp_path):
    out = tmp_path / "run"
    keep = ("--set", "train.checkpoint_every=1", "--set", "train.keep_checkpoints=3")
    assert train(corpus_dir, out, 2, *keep).exit_code == 0
    weights_file = out / "checkpoints" / "step-00000002" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:100])
    resumed = train(corpus_dir, out, 3, *keep)
    assert resumed.exit_code == 0, resumed.output
    named = [line for line in resumed.output.splitlines() if "step-00000002" in line]
    assert len(named) == 1 and named[0].startswith("warning: ") and "CheckpointWarning" not in resumed.output
    assert train_steps(out / "metrics.jsonl") == [1, 2, 3]


def test_a_resume_with_every_checkpoint_damaged_is_a_one_line_error_naming_it(corpus_dir, tmp_path):
    out = tmp_path / "run"
    assert train(corpus_dir, out, 1).exit_code == 0
    weights_file = out / "checkpoints" / "step-00000001" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:100])
    message = one_line_error(train_raw(corpus_dir, out, 2))
    assert "step-00000001" in message and "--no-resume" in message


# ----------------------------------------------------------------------------------------------
# item 13 (data): malformed manifests and truncated shards


@pytest.mark.parametrize("manifest", ["[1, 2, 3]", "{not json", '{"format": "bitlm-corpus/1"}',
                                      '{"format": "bitlm-corpus/1", "window_bytes": 64, "splits": []}'],
                         ids=["list", "bad-json", "no-fields", "splits-list"])
def test_a_malformed_manifest_is_a_one_line_error_naming_it(own_corpus, tmp_path, manifest):
    (own_corpus / "manifest.json").write_text(manifest)
    result = run("train", "--local", "--data", str(own_corpus), "--out", str(tmp_path / "run"), *FAST, "--steps", "1")
    assert "manifest.json" in one_line_error(result)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "unverified"])
def test_a_truncated_shard_is_a_one_line_error_naming_it(own_corpus, tmp_path, verify):
    shard = own_corpus / "train-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:200])
    result = run("train", "--local", "--data", str(own_corpus), "--out", str(tmp_path / "run"), *FAST, "--steps", "1",
                 *([] if verify else ["--no-verify-data"]))
    assert "train-00000.parquet" in one_line_error(result)
    assert not (tmp_path / "run").exists()


def test_a_missing_shard_is_a_one_line_error_naming_it(own_corpus, tmp_path):
    (own_corpus / "val-00000.parquet").unlink()
    result = run("train", "--local", "--data", str(own_corpus), "--out", str(tmp_path / "run"), *FAST, "--steps", "1")
    assert "val-00000.parquet" in one_line_error(result)


# ----------------------------------------------------------------------------------------------
# the same fault in `bitlm prepare`: it replaces its own manifest and shards, nothing else


def test_prepare_refuses_to_replace_a_manifest_that_is_not_a_corpus_manifest(tmp_path):
    out = tmp_path / "app"
    out.mkdir()
    (out / "manifest.json").write_text('{"name": "my web app"}')
    message = one_line_error(prepare(write_corpus(tmp_path), out))
    assert "manifest.json" in message
    assert (out / "manifest.json").read_text() == '{"name": "my web app"}' and listing(out) == ["manifest.json"]


def test_a_rebuilt_corpus_keeps_parquet_files_that_are_not_its_shards(corpus_dir, tmp_path):
    out = Path(shutil.copytree(corpus_dir, tmp_path / "data"))
    (out / "train-extra.parquet").write_bytes(b"mine")
    assert prepare(write_corpus(tmp_path / "again", seed=2), out).exit_code == 0
    assert (out / "train-extra.parquet").read_bytes() == b"mine"
