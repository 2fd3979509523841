"""The gate floors a server applies when a request gives none: the options, else the served run's safety section."""

from __future__ import annotations

import json

from bitlm.config import SafetyConfig
from serve.app import with_run_floors
from serve.schemas import AppArgs


def test_open_floors_come_from_the_served_run(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"safety": {"c_floor": 0.22, "s_floor": 0.61}}))
    a = with_run_floors(AppArgs(model="x"), tmp_path / "model")
    assert (a.c_floor, a.s_floor) == (0.22, 0.61)


def test_given_floors_win_over_the_run(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"safety": {"c_floor": 0.22, "s_floor": 0.61}}))
    a = with_run_floors(AppArgs(model="x", s_floor=0.4), tmp_path / "model")
    assert (a.c_floor, a.s_floor) == (0.22, 0.4)


def test_a_model_without_a_run_gets_the_gate_defaults(tmp_path):
    a = with_run_floors(AppArgs(model="x"), tmp_path / "model")
    assert (a.c_floor, a.s_floor) == (SafetyConfig().c_floor, SafetyConfig().s_floor)
