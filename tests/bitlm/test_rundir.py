"""The safety section a model's run records: found beside <run>/model or a checkpoint, defaults elsewhere."""

from __future__ import annotations

import json

import pytest

from bitlm.config import SafetyConfig
from bitlm.rundir import run_safety_config


def write_run_config(run, **safety):
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps({"model": {}, "safety": safety}))
    return run / "config.json"


def test_a_model_beside_its_run_config_gets_the_runs_safety_section(tmp_path):
    path = write_run_config(tmp_path / "run", c_floor=0.2, s_floor=0.65, burn_in=2)
    assert run_safety_config(tmp_path / "run" / "model") == (SafetyConfig(c_floor=0.2, s_floor=0.65, burn_in=2), path)


def test_a_checkpoint_two_levels_below_the_run_finds_it_too(tmp_path):
    path = write_run_config(tmp_path / "run", decay=0.5)
    assert run_safety_config(tmp_path / "run" / "checkpoints" / "step-00000010") == (SafetyConfig(decay=0.5), path)


def test_a_model_without_a_run_config_gets_the_defaults(tmp_path):
    (tmp_path / "loose").mkdir()
    (tmp_path / "config.json").write_text("not json")  # unreadable files are skipped, not trusted
    assert run_safety_config(tmp_path / "loose" / "model") == (SafetyConfig(), None)


def test_an_invalid_section_is_refused_naming_the_file_and_key(tmp_path):
    path = write_run_config(tmp_path / "run", c_floor=1.5)
    with pytest.raises(ValueError, match=rf"{path}: safety.c_floor"):
        run_safety_config(tmp_path / "run" / "model")
