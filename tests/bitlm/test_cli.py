"""The `bitlm` command line: help, prepare, train (with resume), eval, generate, and its error messages."""

import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bitlm.checkpoint import save_pretrained
from bitlm.cli import main
from bitlm.config import ModelConfig
from bitlm.model import BitTransformerLM

# Small, fast training: the tiny preset on 16-byte contexts, evaluating at the end of a 3-step run.
FAST = ("--preset", "tiny", "--device", "cpu",
        "--set", "train.context_bytes=16", "--set", "train.batch_size=4", "--set", "train.eval_batches=2",
        "--set", "train.eval_every=3", "--set", "train.log_every=1", "--set", "train.warmup_steps=1")
WORDS = ("the quick brown fox jumps over a lazy dog; pack my box with five dozen liquor jugs! "
         "Sphinx of black quartz, judge my vow. 0123456789 (x + y) * z = {a: b}").split()


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def stdout_of(result) -> str:
    """stdout alone: click >= 8.2 mixes stderr into result.output, older click only has it there."""
    return getattr(result, "stdout", result.output)


def write_corpus(root: Path, n_files: int = 3, lines: int = 40, seed: int = 0) -> Path:
    """A few KB of varied text in `n_files` files under root/src; returns that directory."""
    rng = random.Random(seed)
    src = root / "src"
    src.mkdir(parents=True)
    for i in range(n_files):
        text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(lines))
        (src / f"part{i}.txt").write_text(text + "\n")
    return src


def prepare(src: Path, out: Path):
    return invoke("prepare", str(src), "--out", str(out), "--window-bytes", "64", "--quiet")


def train(data: Path, out: Path, steps: int, *extra: str):
    return invoke("train", "--local", "--data", str(data), "--out", str(out), "--steps", str(steps), *FAST, *extra)


def train_steps(metrics_path: Path) -> list[int]:
    """The steps of the training-log records (the ones with a learning rate) in metrics.jsonl."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    return [int(r["step"]) for r in records if "lr" in r]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-corpus")
    result = prepare(write_corpus(root), root / "data")
    assert result.exit_code == 0, result.output
    return root / "data"


@pytest.fixture(scope="module")
def untrained_model_dir(tmp_path_factory) -> Path:
    """A tiny model saved without training: enough for commands that only load one."""
    return save_pretrained(BitTransformerLM(ModelConfig.from_name("tiny")), tmp_path_factory.mktemp("m") / "model")




def test_group_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("prepare", "train", "eval", "generate", "demo"):
        assert command in result.output


def test_short_help_flag_works():
    result = invoke("-h")
    assert result.exit_code == 0 and "prepare" in result.output


def test_version_option_prints_the_package_version():
    import bitlm

    result = invoke("--version")
    assert result.exit_code == 0 and bitlm.__version__ in result.output


@pytest.mark.parametrize("command, options", [
    ("prepare", ("--out", "--window-bytes", "--val-fraction", "--max-bytes", "--quiet")),
    ("train", ("--local", "--data", "--out", "--preset", "--config", "--set", "--minutes", "--steps", "--resume",
               "--device")),
    ("eval", ("--json", "--max-bytes", "--overlap-bytes", "--device")),
    ("generate", ("--prompt", "--max-new-bytes", "--temperature", "--top-k", "--top-p", "--sampling-unit", "--seed")),
    ("demo", ("--out", "--minutes", "--max-corpus-bytes")),
])
def test_command_help_mentions_its_key_options(command, options):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    missing = [option for option in options if option not in result.output]
    assert missing == []


def test_console_script_runs_help():
    script = shutil.which("bitlm", path=str(Path(sys.executable).parent)) or shutil.which("bitlm")
    if script is None:
        pytest.skip("the bitlm console script is not installed")
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "generate" in proc.stdout




def test_prepare_writes_manifest_and_shards_and_reports_window_counts(tmp_path):
    out = tmp_path / "data"
    result = prepare(write_corpus(tmp_path), out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    splits = manifest["splits"]
    assert manifest["n_files"] == 3 and manifest["window_bytes"] == 64
    for split in ("train", "val"):
        assert splits[split]["n_windows"] >= 1
        assert all((out / shard["file"]).is_file() for shard in splits[split]["shards"])
    assert sorted(p.name for p in out.glob("*.parquet")) == ["train-00000.parquet", "val-00000.parquet"]
    assert f"train {splits['train']['n_windows']} windows" in result.output
    assert f"val {splits['val']['n_windows']} windows" in result.output


def test_prepare_shows_no_progress_bar_with_quiet(tmp_path):
    result = prepare(write_corpus(tmp_path), tmp_path / "data")
    assert result.exit_code == 0
    assert stdout_of(result).startswith("prepared ") and "reading" not in result.output


def test_prepare_with_a_nonexistent_source_fails_naming_it(tmp_path):
    missing = tmp_path / "no-such-dir"
    result = invoke("prepare", str(missing), "--out", str(tmp_path / "data"), "--quiet")
    assert result.exit_code != 0
    assert str(missing) in result.output
    assert not (tmp_path / "data" / "manifest.json").exists()


def test_prepare_with_too_little_text_fails_with_a_clear_message(tmp_path):
    (tmp_path / "small.txt").write_text("just a few bytes")
    result = invoke("prepare", str(tmp_path / "small.txt"), "--out", str(tmp_path / "data"), "--quiet")
    assert result.exit_code != 0
    assert "too small" in result.output




def test_prepare_train_eval_generate_end_to_end(tmp_path):
    src = write_corpus(tmp_path)
    data, run = tmp_path / "data", tmp_path / "run"
    assert prepare(src, data).exit_code == 0

    trained = train(data, run, 3)
    assert trained.exit_code == 0, trained.output
    model_dir = run / "model"
    assert (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val/bpb" in r for r in records)
    assert train_steps(run / "metrics.jsonl") == [1, 2, 3]
    assert "val bpb" in trained.output
    assert json.loads((run / "config.json").read_text())["train"]["max_steps"] == 3

    scored = invoke("eval", str(model_dir), str(src / "part0.txt"), "--json", "--device", "cpu")
    assert scored.exit_code == 0, scored.output
    result = json.loads(stdout_of(scored))
    for key in ("bpb", "K", "C", "S", "gzip-9"):
        assert math.isfinite(result[key]), (key, result)
    assert result["bpb"] > 0
    assert result["n_bytes"] == len((src / "part0.txt").read_bytes()) - 1

    args = ("generate", str(model_dir), "--prompt", "ab", "--max-new-bytes", "5", "--seed", "1", "--device", "cpu")
    first, second = invoke(*args), invoke(*args)
    assert first.exit_code == 0, first.output
    assert stdout_of(first).startswith("ab")
    assert stdout_of(first) == stdout_of(second)


def test_train_into_the_same_out_resumes_from_the_last_step(corpus_dir, tmp_path):
    run = tmp_path / "run"
    assert train(corpus_dir, run, 2).exit_code == 0
    assert train_steps(run / "metrics.jsonl") == [1, 2]
    resumed = train(corpus_dir, run, 4)
    assert resumed.exit_code == 0, resumed.output
    assert train_steps(run / "metrics.jsonl") == [1, 2, 3, 4]
    assert "done: 4 steps" in resumed.output


def test_train_with_no_resume_starts_from_step_one(corpus_dir, tmp_path):
    run = tmp_path / "run"
    assert train(corpus_dir, run, 2).exit_code == 0
    assert train(corpus_dir, run, 2, "--no-resume").exit_code == 0
    assert train_steps(run / "metrics.jsonl") == [1, 2]


def test_a_fresh_run_replaces_the_checkpoints_of_a_longer_earlier_run(corpus_dir, tmp_path):
    run = tmp_path / "run"
    assert train(corpus_dir, run, 4).exit_code == 0
    assert train(corpus_dir, run, 2, "--no-resume").exit_code == 0
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]
    again = train(corpus_dir, run, 3)  # resumes the fresh run, not the old one
    assert "done: 3 steps" in again.output


def test_resuming_with_a_different_model_is_refused_and_keeps_the_run_config(corpus_dir, tmp_path):
    run = tmp_path / "run"
    assert train(corpus_dir, run, 2).exit_code == 0
    before = (run / "config.json").read_text()
    changed = CliRunner().invoke(main, ["train", "--local", "--data", str(corpus_dir), "--out", str(run), "--steps", "4",
                                        *FAST, "--set", "model.n_layers=3"])
    assert changed.exit_code != 0
    assert "different model" in changed.output and "--no-resume" in changed.output
    assert (run / "config.json").read_text() == before


def run_config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def test_train_minutes_sets_a_time_budget_and_steps_still_caps_it(corpus_dir, tmp_path):
    run = tmp_path / "run"
    assert train(corpus_dir, run, 1, "--minutes", "0.5").exit_code == 0
    assert run_config(run)["train"]["max_seconds"] == 30.0
    assert run_config(run)["train"]["max_steps"] == 1
    assert train_steps(run / "metrics.jsonl") == [1]


def test_train_set_overrides_take_precedence_over_steps(corpus_dir, tmp_path):
    run = tmp_path / "run"
    assert train(corpus_dir, run, 5, "--set", "train.max_steps=1", "--set", "model.n_layers=1").exit_code == 0
    cfg = run_config(run)
    assert cfg["train"]["max_steps"] == 1 and cfg["model"]["n_layers"] == 1
    assert cfg["train"]["context_bytes"] == 16  # FAST's, not the model's 128 or the corpus's 64
    assert json.loads((run / "model" / "config.json").read_text())["model"]["n_layers"] == 1


def test_train_config_file_replaces_the_preset(corpus_dir, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert train(corpus_dir, first, 1, "--set", "model.d_ff=96").exit_code == 0
    result = invoke("train", "--local", "--data", str(corpus_dir), "--out", str(second), "--config", str(first / "config.json"),
                    "--preset", "base", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert run_config(second) == run_config(first)


def fast_without_context() -> list[str]:
    args = list(FAST)
    i = args.index("train.context_bytes=16")
    return args[:i - 1] + args[i + 1:]


def test_train_without_a_context_trains_at_the_models_own(corpus_dir, tmp_path):
    run = tmp_path / "run"
    result = invoke("train", "--local", "--data", str(corpus_dir), "--out", str(run), "--steps", "1",
                    *fast_without_context(), "--set", "model.max_positions=32")
    assert result.exit_code == 0, result.output
    assert run_config(run)["train"]["context_bytes"] == 32
    assert "-byte windows" not in result.output


def test_train_without_a_context_is_cut_to_the_corpus_window_and_says_so(corpus_dir, tmp_path):
    run = tmp_path / "run"  # the tiny preset takes 128 bytes; the corpus holds 64-byte windows
    result = invoke("train", "--local", "--data", str(corpus_dir), "--out", str(run), "--steps", "1",
                    *fast_without_context())
    assert result.exit_code == 0, result.output
    assert run_config(run)["train"]["context_bytes"] == 64
    assert "training at 64-byte windows, the corpus's (the model takes 128 bytes" in result.output


def test_train_with_an_unknown_set_key_fails_naming_it(tmp_path):
    run = tmp_path / "run"
    result = invoke("train", "--local", "--data", str(tmp_path), "--out", str(run), "--preset", "tiny", "--set", "model.nope=1")
    assert result.exit_code != 0
    assert "model.nope" in result.output
    assert not run.exists()


def test_train_with_an_invalid_set_value_fails_naming_the_field(tmp_path):
    run = tmp_path / "run"
    result = invoke("train", "--local", "--data", str(tmp_path), "--out", str(run), "--preset", "tiny",
                    "--set", "model.dropout=2")
    assert result.exit_code != 0
    assert "model.dropout" in result.output
    assert not run.exists()


def test_train_with_a_set_lacking_equals_explains_the_syntax(tmp_path):
    result = invoke("train", "--local", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--set", "model.n_layers")
    assert result.exit_code != 0
    assert "key=value" in result.output


def test_train_on_a_directory_without_a_corpus_fails_pointing_at_prepare(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["train", "--local", "--data", str(empty), "--out", str(tmp_path / "run"), *FAST])
    assert result.exit_code != 0
    # Today this surfaces as an uncaught FileNotFoundError; a click error would also satisfy this.
    assert "bitlm prepare" in result.output + str(result.exception or "")
    assert not (tmp_path / "run").exists()




def test_eval_on_a_one_byte_file_fails_with_a_clear_message(untrained_model_dir, tmp_path):
    one = tmp_path / "one.txt"
    one.write_bytes(b"a")
    result = invoke("eval", str(untrained_model_dir), str(one), "--device", "cpu")
    assert result.exit_code != 0
    assert "at least 2 bytes" in result.output


def test_eval_text_output_reports_bpb_beside_compressors(untrained_model_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello, bit-level world! " * 8)
    result = invoke("eval", str(untrained_model_dir), str(text), "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "bits/byte: model" in result.output and "gzip -9" in result.output and "xz -9e" in result.output


def test_eval_of_a_missing_model_dir_fails(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    result = invoke("eval", str(tmp_path / "nope"), str(text))
    assert result.exit_code != 0
    assert "nope" in result.output


def test_generate_with_an_empty_prompt_fails_with_a_clear_message(untrained_model_dir):
    result = invoke("generate", str(untrained_model_dir), "--prompt", "", "--max-new-bytes", "2", "--device", "cpu")
    assert result.exit_code != 0
    assert "prompt must be at least one byte" in result.output


@pytest.mark.parametrize("kind, arch, representation", [("patched", "patched", "bit"), ("flat", "flat", "bit"),
                                                         ("byte", "flat", "byte")])
def test_arch_selects_the_model_kind_with_a_context_sized_for_it(corpus_dir, tmp_path, kind, arch, representation):
    run = tmp_path / kind
    result = train(corpus_dir, run, 2, "--arch", kind)
    assert result.exit_code == 0, result.output
    model = run_config(run)["model"]
    assert (model["arch"], model["representation"]) == (arch, representation)
    positions_per_byte = 9 if kind == "flat" else 1
    assert model["max_positions"] == 128 * positions_per_byte  # the tiny preset's 128-byte context


def test_train_defaults_to_the_patched_architecture(corpus_dir, tmp_path):
    assert train(corpus_dir, tmp_path / "run", 1).exit_code == 0
    assert run_config(tmp_path / "run")["model"]["arch"] == "patched"


def test_diffusion_train_eval_and_generate_end_to_end(corpus_dir, tmp_path):
    run = tmp_path / "diffusion"
    trained = train(corpus_dir, run, 3, "--diffusion", "--noise-schedule", "linear", "--diffusion-curriculum")
    assert trained.exit_code == 0, trained.output
    assert "val ELBO bpb" in trained.output and "(upper bound)" in trained.output
    config = run_config(run)
    assert config["model"]["causal"] is False
    assert config["diffusion"] == {"noise_schedule": "linear", "steps": 16, "curriculum": True}
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 8)
    scored = invoke("eval", str(run / "model"), str(text), "--json")
    assert scored.exit_code == 0, scored.output
    assert json.loads(stdout_of(scored))["elbo_bpb"] > 0
    sample = invoke("generate", str(run / "model"), "--prompt", "ab", "--max-new-bytes", "6",
                    "--diffusion-steps", "4", "--seed", "0")
    assert sample.exit_code == 0, sample.output
    assert stdout_of(sample).startswith("ab")


def test_generate_sampling_unit_byte_on_the_flat_bit_model_fails_naming_the_option(untrained_model_dir):
    result = invoke("generate", str(untrained_model_dir), "--sampling-unit", "byte", "--max-new-bytes", "2",
                    "--device", "cpu")
    assert result.exit_code == 2 and "--sampling-unit" in result.output and "patched" in result.output


def test_generate_sampling_unit_bit_and_byte_both_sample_a_patched_model(tmp_path):
    model_dir = save_pretrained(BitTransformerLM(ModelConfig.from_name("tiny", kind="patched")), tmp_path / "model")
    outputs = {}
    for unit in ("bit", "byte"):
        result = invoke("generate", str(model_dir), "--prompt", "ab", "--max-new-bytes", "4", "--seed", "1",
                        "--sampling-unit", unit, "--device", "cpu")
        assert result.exit_code == 0, result.output
        outputs[unit] = result.output
    default = invoke("generate", str(model_dir), "--prompt", "ab", "--max-new-bytes", "4", "--seed", "1", "--device", "cpu")
    assert default.output == outputs["byte"] and outputs["byte"].startswith("ab")


def test_diffusion_generation_from_a_causal_model_is_refused(untrained_model_dir):
    result = CliRunner().invoke(main, ["generate", str(untrained_model_dir), "--diffusion"])
    assert result.exit_code != 0 and "causal model" in result.output


def test_safe_generation_prints_the_sample_and_a_json_verdict(untrained_model_dir):
    result = invoke("generate", str(untrained_model_dir), "--prompt", "ab", "--max-new-bytes", "8", "--seed", "1",
                    "--safe", "--c-floor", "0", "--s-floor", "0")
    assert result.exit_code == 0, result.output
    assert stdout_of(result).startswith("ab")
    verdict = json.loads(result.stderr.strip().splitlines()[-1])
    assert verdict["passed"] is True and verdict["c_floor"] == 0.0 and len(verdict["attempts"]) == 1


def test_safe_generation_takes_its_gate_defaults_from_the_runs_safety_section(untrained_model_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(untrained_model_dir, run / "model")
    (run / "config.json").write_text(json.dumps({"safety": {"c_floor": 1.0, "s_floor": 1.0, "max_retries": 0}}))
    result = invoke("generate", str(run / "model"), "--prompt", "ab", "--max-new-bytes", "8", "--seed", "1", "--safe")
    verdict = json.loads(result.stderr.strip().splitlines()[-1])
    assert verdict["passed"] is False and verdict["c_floor"] == 1.0 and len(verdict["attempts"]) == 1
    result = invoke("generate", str(run / "model"), "--prompt", "ab", "--max-new-bytes", "8", "--seed", "1", "--safe",
                    "--c-floor", "0", "--s-floor", "0")  # an option still wins over the run's setting
    assert json.loads(result.stderr.strip().splitlines()[-1])["passed"] is True


def test_strict_safe_generation_that_is_always_blocked_exits_with_the_verdict(untrained_model_dir):
    result = CliRunner().invoke(main, ["generate", str(untrained_model_dir), "--prompt", "ab", "--max-new-bytes", "8",
                                       "--safe", "--c-floor", "1.0", "--s-floor", "1.0", "--max-retries", "1",
                                       "--strict"])
    assert result.exit_code != 0
    assert "blocked by the safety gate" in result.output
    assert '"attempts"' in result.stderr
