"""Hostile and careless config inputs (issue 10, items 4, 5 and 13): each is one error naming the field."""

import dataclasses
import json
import typing

import pytest
from click.testing import CliRunner

from bitlm.cli import main
from bitlm.config import (DiffusionConfig, ExperimentConfig, ModelConfig, ScalingConfig, TrainConfig, apply_overrides,
                          from_dict)

MAX_SEED = 2 ** 32 - 1  # the documented seed range is [0, 2**32 - 1]


def float_fields() -> list[str]:
    """Dotted names of every float (or Optional[float]) field of an ExperimentConfig."""
    names = []
    for section, cls in (("model", ModelConfig), ("train", TrainConfig), ("diffusion", DiffusionConfig),
                         ("scaling", ScalingConfig)):
        hints = typing.get_type_hints(cls)
        names += [f"{section}.{f.name}" for f in dataclasses.fields(cls)
                  if hints[f.name] is float or float in typing.get_args(hints[f.name])]
    return names


def nested(key: str, value) -> dict:
    """{"train": {"lr": value}} for "train.lr"."""
    section, name = key.split(".")
    return {section: {name: value}}


# ---------------------------------------------------------------- non-finite floats (item 4)

@pytest.mark.parametrize("key", float_fields())
@pytest.mark.parametrize("text", ["inf", "-inf", "nan"])
def test_a_non_finite_float_override_is_refused_naming_the_field(key, text):
    with pytest.raises(ValueError, match=rf"^{key}: must be finite"):
        apply_overrides(ExperimentConfig(), [f"{key}={text}"])


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN"])
def test_a_non_finite_float_in_a_json_config_is_refused(literal):
    data = json.loads(f'{{"train": {{"lambda_k": {literal}}}}}')  # Python's json reads these
    with pytest.raises(ValueError, match=r"^train.lambda_k: must be finite"):
        from_dict(ExperimentConfig, data)


def test_an_int_too_large_for_a_float_field_is_refused():
    with pytest.raises(ValueError, match=r"^train.lr: must be finite"):
        from_dict(TrainConfig, {"lr": 10 ** 400})


def test_a_non_finite_float_given_in_python_is_refused():
    with pytest.raises(ValueError, match=r"^train.grad_clip: must be finite"):
        TrainConfig(grad_clip=float("inf"))


def test_the_run_section_refuses_a_non_finite_float():
    from pipelines.train import PipelineConfig

    with pytest.raises(ValueError, match=r"^run.cpus_per_worker: must be finite"):
        apply_overrides(PipelineConfig(), ["run.cpus_per_worker=inf"])


# ---------------------------------------------------------------- field types on load (item 5)

WRONG_TYPES = [
    pytest.param("model.causal", "false", "expected bool, got str 'false'", id="str-for-bool"),
    pytest.param("model.parity", 0, "expected bool, got int 0", id="int-for-bool"),
    pytest.param("train.batch_size", True, "expected int, got bool True", id="bool-for-int"),
    pytest.param("model.d_model", "64", "expected int, got str '64'", id="str-for-int"),
    pytest.param("model.d_model", None, "expected int, got None", id="null-for-int"),
    pytest.param("model.d_model", 64.0, "expected int, got float 64.0", id="float-for-int"),
    pytest.param("model.n_layers", [2], "expected int, got list [2]", id="list-for-int"),
    pytest.param("train.lr", "0.1", "expected float, got str '0.1'", id="str-for-float"),
    pytest.param("train.lr", False, "expected float, got bool False", id="bool-for-float"),
    pytest.param("train.lr", None, "expected float, got None", id="null-for-float"),
    pytest.param("model.chunk_size", "64", "expected int or None, got str '64'", id="str-for-optional-int"),
    pytest.param("train.max_seconds", "60", "expected float or None, got str '60'", id="str-for-optional-float"),
    pytest.param("model.arch", 5, "must be one of ['flat', 'patched'], got 5", id="int-for-choice"),
    pytest.param("train.schedule", None, "must be one of ['cosine', 'onecycle', 'constant', 'wsd'], got None",
                 id="null-for-choice"),
    pytest.param("scaling.order", 3, "expected str, got int 3", id="int-for-str"),
]


@pytest.mark.parametrize("key, value, expected", WRONG_TYPES)
def test_a_wrongly_typed_field_in_a_nested_section_is_refused_naming_it(key, value, expected):
    with pytest.raises(ValueError) as info:
        from_dict(ExperimentConfig, nested(key, value))
    assert str(info.value) == f"{key}: {expected}"


def test_a_wrongly_typed_field_of_a_lone_section_names_its_section():
    # checkpoint config.json holds a ModelConfig alone; the error still says model.d_model
    with pytest.raises(ValueError, match=r"^model.d_model: expected int"):
        from_dict(ModelConfig, {"d_model": "64"})


@pytest.mark.parametrize("value", [5, None, [1], "tiny"])
def test_a_section_that_is_not_an_object_is_refused_naming_it(value):
    with pytest.raises(ValueError, match=r"^model: expected an object"):
        from_dict(ExperimentConfig, {"model": value})


def test_a_config_that_is_not_an_object_is_refused():
    with pytest.raises(ValueError, match="expected an object"):
        from_dict(ExperimentConfig, [1, 2])


def test_a_float_field_takes_a_json_int_and_stores_a_float():
    lr = from_dict(ExperimentConfig, {"train": {"lr": 1}}).train.lr
    assert lr == 1.0 and type(lr) is float


def test_an_optional_field_takes_null():
    assert from_dict(ExperimentConfig, {"model": {"chunk_size": None}}).model.chunk_size is None


def test_the_run_section_of_a_pipeline_config_is_type_checked():
    from pipelines.train import PipelineConfig

    with pytest.raises(ValueError, match=r"^run.num_workers: expected int, got str '2'"):
        from_dict(PipelineConfig, {"run": {"num_workers": "2"}})


# ---------------------------------------------------------------- seeds, integers, sizes (item 13)

@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1])
def test_a_seed_outside_the_range_is_refused_naming_it(seed):
    with pytest.raises(ValueError, match=rf"^train.seed: must be in \[0, {MAX_SEED}\]"):
        TrainConfig(seed=seed)


def test_the_largest_seed_is_accepted():
    assert TrainConfig(seed=MAX_SEED).seed == MAX_SEED


@pytest.mark.parametrize("text", ["-1", "1e23", "18446744073709551616"])
def test_a_seed_override_outside_the_range_is_refused(text):
    with pytest.raises(ValueError, match=r"^train.seed: must be in"):
        apply_overrides(ExperimentConfig(), [f"train.seed={text}"])


def test_a_huge_integer_override_is_parsed_exactly():
    # through a float, 2**60 + 1 became 2**60
    cfg = apply_overrides(ExperimentConfig(), [f"scaling.max_parameters={2 ** 60 + 1}"])
    assert cfg.scaling.max_parameters == 2 ** 60 + 1


def test_integral_exponent_notation_is_parsed_exactly():
    cfg = apply_overrides(ExperimentConfig(), ["scaling.max_parameters=1.000000000000000001e18"])
    assert cfg.scaling.max_parameters == 10 ** 18 + 1


def test_an_int_override_with_an_absurd_exponent_is_refused():
    with pytest.raises(ValueError, match=r"^train.max_steps: .*out of range"):
        apply_overrides(ExperimentConfig(), ["train.max_steps=1e999999999"])


@pytest.mark.parametrize("text", ["inf", "nan", "2.5", "1e-3", "0x10"])
def test_an_int_override_that_is_no_integer_is_refused(text):
    with pytest.raises(ValueError, match=r"^train.max_steps: expected int"):
        apply_overrides(ExperimentConfig(), [f"train.max_steps={text}"])


@pytest.mark.parametrize("kind", ["patched", "flat", "byte"])
def test_context_bytes_above_the_model_context_is_refused_naming_the_maximum(kind):
    model = ModelConfig.from_name("tiny", kind=kind)  # a context of 128 bytes
    with pytest.raises(ValueError, match=r"^train.context_bytes: must be <= 128"):
        ExperimentConfig(model=model, train=TrainConfig(context_bytes=129))


@pytest.mark.parametrize("kind", ["patched", "flat", "byte"])
def test_context_bytes_equal_to_the_model_context_is_accepted(kind):
    model = ModelConfig.from_name("tiny", kind=kind)
    assert ExperimentConfig(model=model, train=TrainConfig(context_bytes=128)).train.context_bytes == 128


def test_context_bytes_above_the_model_context_is_refused_with_scaling_enabled():
    # fit refuses it at start-up either way: context expansions start from a context that fits
    with pytest.raises(ValueError, match=r"^train.context_bytes"):
        ExperimentConfig(model=ModelConfig.from_name("tiny"), train=TrainConfig(context_bytes=256),
                         scaling=ScalingConfig(enabled=True))


@pytest.mark.parametrize("key, value, allowed", [
    ("model.d_model", 10 ** 7, "[1, 65536]"),
    ("model.n_layers", 10 ** 5, "[1, 1024]"),
    ("model.n_heads", 10 ** 5, "[1, 1024]"),
    ("model.d_ff", 10 ** 9, "[1, 1048576]"),
    ("model.max_positions", 2 ** 30, f"[1, {2 ** 24}]"),
    ("model.chunk_size", 2 ** 30, f"[1, {2 ** 24}]"),
    ("train.batch_size", 10 ** 8, "[1, 1000000]"),
    ("train.context_bytes", 2 ** 30, f"[2, {2 ** 24}]"),
    ("scaling.add_layers", 10 ** 5, "[1, 1024]"),
])
def test_an_absurd_size_is_refused_naming_the_allowed_range(key, value, allowed):
    with pytest.raises(ValueError) as info:
        apply_overrides(ExperimentConfig(), [f"{key}={value}"])
    assert str(info.value).startswith(f"{key}: must be") and allowed in str(info.value)


# ---------------------------------------------------------------- the same through `bitlm train` (CLI)

def train_local(tmp_path, *args: str):
    """`bitlm train --local` on an empty --data: config errors come before the corpus is read."""
    return CliRunner().invoke(main, ["train", "--local", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                                     "--preset", "tiny", "--device", "cpu", *args])


def assert_usage_error(result, *words: str) -> None:
    """Exit code 2 (click's usage error), no traceback, one error line containing every word."""
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    for word in words:
        assert word in errors[0], errors[0]


@pytest.mark.parametrize("assignment, words", [
    pytest.param("train.lr=inf", ("train.lr", "finite"), id="lr-inf"),
    pytest.param("train.lr=nan", ("train.lr", "finite"), id="lr-nan"),
    pytest.param("train.lambda_k=inf", ("train.lambda_k", "finite"), id="lambda_k-inf"),
    pytest.param("train.seed=-1", ("train.seed", str(MAX_SEED)), id="seed-negative"),
    pytest.param("train.seed=1e23", ("train.seed", str(MAX_SEED)), id="seed-1e23"),
    pytest.param("train.context_bytes=4096", ("train.context_bytes", "128"), id="context-above-model"),
    pytest.param("train.batch_size=100000000", ("train.batch_size", "1000000"), id="batch-absurd"),
    pytest.param("model.d_model=6400000", ("model.d_model", "65536"), id="d_model-absurd"),
])
def test_train_with_a_bad_set_is_a_usage_error_naming_the_field(tmp_path, assignment, words):
    result = train_local(tmp_path, "--set", assignment)
    assert_usage_error(result, *words)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("section, name, value", [
    pytest.param("model", "causal", "false", id="str-for-bool"),
    pytest.param("train", "batch_size", True, id="bool-for-int"),
    pytest.param("model", "d_model", "64", id="str-for-int"),
    pytest.param("model", "d_model", None, id="null-for-int"),
])
def test_train_with_a_wrongly_typed_config_file_is_a_usage_error_naming_the_field(tmp_path, section, name, value):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({section: {name: value}}))
    result = train_local(tmp_path, "--config", str(config))
    assert_usage_error(result, f"{section}.{name}", "expected")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text", ['{"model": ', "[1, 2]", ""])
def test_train_with_a_config_file_that_is_no_json_object_names_the_file(tmp_path, text):
    config = tmp_path / "broken.json"
    config.write_text(text)
    result = train_local(tmp_path, "--config", str(config))
    assert_usage_error(result, "broken.json")
