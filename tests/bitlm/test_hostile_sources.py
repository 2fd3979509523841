"""Hostile inputs to the commands that load a model (generate, eval, serve): one-line errors, nothing left behind.

Damaged model directories get the same message from all three commands, before Ray starts; so do
a bad --audit-log, a port in use and a bogus runs:/ URI. Options are checked by name.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bitlm.checkpoint import CheckpointError, resolve_pretrained, save_pretrained, validate_pretrained
from bitlm.cli import main
from bitlm.config import ExperimentConfig, ModelConfig, to_json
from bitlm.model import BitTransformerLM
from serve.local import free_port


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_one_line_error(result, *names: str) -> str:
    """The usage error's line (exit 2, no traceback), which must name each of `names`."""
    output = result.output
    assert result.exit_code == 2, output + repr(result.exception)
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_pretrained(BitTransformerLM(ModelConfig.from_name("tiny")), tmp_path_factory.mktemp("good") / "model")


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if a command gets as far as starting Ray."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("ray.init was reached")

    monkeypatch.setattr(ray, "init", refuse)


def _truncate(d: Path) -> None:
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])


def _pickle(d: Path) -> None:
    torch.save({"w": torch.zeros(2)}, d / "model.safetensors")


def _bad_json(d: Path) -> None:
    (d / "config.json").write_text('{"format": "bitlm/1", "model": {')


def _edit_model(d: Path, **fields) -> None:
    config = json.loads((d / "config.json").read_text())
    config["model"].update(fields)
    (d / "config.json").write_text(json.dumps(config))


DAMAGES = {
    "truncated weights": (_truncate, "model.safetensors", "truncated"),
    "pickle renamed": (_pickle, "model.safetensors", "pickle"),
    "malformed config": (_bad_json, "config.json", "not valid JSON"),
    "unknown config field": (lambda d: _edit_model(d, colour="red"), "config.json", "colour"),
    "config of another model": (lambda d: _edit_model(d, n_layers=3), "model.safetensors", "does not match"),
}


@pytest.fixture(params=sorted(DAMAGES))
def damaged(request, model_dir, tmp_path) -> tuple[Path, str, str]:
    """(damaged copy of the model, the file the message must name, a word of what is wrong)."""
    damage, file_name, fault = DAMAGES[request.param]
    copy = tmp_path / "damaged"
    shutil.copytree(model_dir, copy)
    damage(copy)
    return copy, file_name, fault


def test_a_damaged_model_is_the_same_one_line_error_in_generate_eval_and_serve(damaged, tmp_path, no_ray):
    directory, file_name, fault = damaged
    with pytest.raises(CheckpointError) as expected:
        validate_pretrained(directory)
    message = str(expected.value)
    assert str(directory / file_name) in message and fault in message
    text = tmp_path / "t.txt"
    text.write_text("hello hello hello")
    for args in (("generate", str(directory), "--device", "cpu"), ("eval", str(directory), str(text)),
                 ("serve", "--model", str(directory), "--allowed-root", str(tmp_path), "--port", str(free_port()),
                  "--audit-log", str(tmp_path / "audit.jsonl"))):
        assert message in assert_one_line_error(run(*args)), args


def _run_directory(root: Path, model_dir: Path, *, with_model: bool, steps: tuple[int, ...] = ()) -> Path:
    """A `bitlm train` output directory: the run's ExperimentConfig, checkpoints/step-N, and model/."""
    run_dir = root / "runs" / "t1"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(to_json(ExperimentConfig(model=ModelConfig.from_name("tiny"))))
    for step in steps:
        shutil.copytree(model_dir, run_dir / "checkpoints" / f"step-{step:08d}")
    if with_model:
        shutil.copytree(model_dir, run_dir / "model")
    return run_dir


def test_a_run_directory_is_its_model_for_generate_eval_and_serve(model_dir, tmp_path):
    from serve.model_sources import resolve_source

    run_dir = _run_directory(tmp_path, model_dir, with_model=True, steps=(3, 10))
    assert resolve_pretrained(run_dir) == run_dir / "model"
    assert resolve_source(str(run_dir), [tmp_path]) == (run_dir / "model").resolve()
    generated = run("generate", str(run_dir), "--prompt", "ab", "--max-new-bytes", "3", "--seed", "1",
                    "--device", "cpu")
    assert generated.exit_code == 0, generated.output
    assert generated.output == run("generate", str(model_dir), "--prompt", "ab", "--max-new-bytes", "3",
                                   "--seed", "1", "--device", "cpu").output
    text = tmp_path / "t.txt"
    text.write_text("hello hello hello")
    scored = run("eval", str(run_dir), str(text), "--json", "--device", "cpu")
    assert scored.exit_code == 0 and json.loads(scored.output)["n_bytes"] == 16


def test_a_run_directory_without_a_model_uses_its_newest_checkpoint(model_dir, tmp_path):
    run_dir = _run_directory(tmp_path, model_dir, with_model=False, steps=(3, 10))
    assert resolve_pretrained(run_dir) == run_dir / "checkpoints" / "step-00000010"


def test_a_run_directory_with_nothing_to_load_says_so(model_dir, tmp_path):
    run_dir = _run_directory(tmp_path, model_dir, with_model=False)
    line = assert_one_line_error(run("generate", str(run_dir)), str(run_dir / "config.json"))
    assert "training run's config" in line


def test_serve_refuses_an_audit_log_that_is_a_directory_before_starting_ray(model_dir, tmp_path, no_ray):
    result = run("serve", "--model", str(model_dir), "--allowed-root", str(model_dir.parent),
                 "--port", str(free_port()), "--audit-log", str(tmp_path))
    assert "Is a directory" in assert_one_line_error(result, "--audit-log", str(tmp_path))


def test_serve_on_a_port_in_use_is_one_line_before_starting_ray(model_dir, no_ray):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "--model", str(model_dir), "--allowed-root", str(model_dir.parent),
                     "--port", str(port))
    assert "in use" in assert_one_line_error(result, "--port", str(port))


def test_serve_asking_for_more_cpus_than_the_machine_has_is_refused_before_starting_ray(model_dir, no_ray):
    result = run("serve", "--model", str(model_dir), "--allowed-root", str(model_dir.parent),
                 "--port", str(free_port()), "--num-cpus", "4096")
    assert "CPUs" in assert_one_line_error(result, "--num-cpus")


def test_a_bogus_runs_uri_leaves_no_download_directory(tmp_path, monkeypatch, no_ray):
    import mlflow

    store = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.MlflowClient(tracking_uri=store).search_experiments()  # creates the store's tables
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("BITLM_SERVE_CACHE", str(tmp_path / "cache"))
    try:
        result = run("serve", "--model", "runs:/0123456789abcdef/model", "--port", str(free_port()))
    finally:
        mlflow.set_tracking_uri(None)
    assert "MLflow download failed" in assert_one_line_error(result, "--model", "runs:/0123456789abcdef/model")
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_runs_uri_without_an_mlflow_store_creates_none(tmp_path, monkeypatch, no_ray):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("BITLM_SERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    result = run("serve", "--model", "runs:/0123456789abcdef/model", "--port", str(free_port()))
    assert "no MLflow store" in assert_one_line_error(result, "--model", str(tmp_path / "mlflow.db"))
    assert list(tmp_path.iterdir()) == []


BAD_OPTIONS = [
    (("generate", "--temperature", "nan"), "--temperature"),
    (("generate", "--temperature", "inf"), "--temperature"),
    (("generate", "--top-p", "nan"), "--top-p"),
    (("generate", "--seed", str(10**23)), "--seed"),
    (("generate", "--seed", "-1"), "--seed"),
    (("generate", "--seed", "1e23"), "--seed"),
    (("generate", "--safe", "--c-floor", "nan"), "--c-floor"),
    (("generate", "--diffusion-steps", "0"), "--diffusion-steps"),
    (("generate", "--device", "bogus"), "--device"),
    (("generate", "--prompt", "\udcffab"), "--prompt"),  # a shell argument that is not UTF-8
    (("eval", "--max-bytes", "-1"), "--max-bytes"),
    (("eval", "--overlap-bytes", "-1"), "--overlap-bytes"),
    (("eval", "--overlap-bytes", "100000"), "--overlap-bytes"),
    (("eval", "--device", "cuda:99"), "--device"),
]


@pytest.mark.parametrize("args,option", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_a_bad_option_value_is_a_one_line_error_naming_it(model_dir, tmp_path, args, option):
    command, *options = args
    text = tmp_path / "t.txt"
    text.write_text("hello hello hello")
    positional = [str(model_dir)] + ([str(text)] if command == "eval" else [])
    assert_one_line_error(run(command, *positional, *options), option)


def test_safe_generation_at_temperature_zero_is_greedy(model_dir):
    common = ("generate", str(model_dir), "--prompt", "ab", "--max-new-bytes", "8", "--temperature", "0",
              "--seed", "3", "--device", "cpu")
    greedy = run(*common)
    safe = run(*common, "--safe", "--c-floor", "0", "--s-floor", "0")
    assert greedy.exit_code == 0 and safe.exit_code == 0, safe.output
    assert greedy.stdout.splitlines()[0] == safe.stdout.splitlines()[0]
