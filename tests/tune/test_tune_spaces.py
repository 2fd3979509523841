"""Search spaces, resources and the gate probes: plain functions, no Ray cluster."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bitlm.config import ModelConfig
from bitlm.data import bit_marginals
from bitlm.safety import SafetyConfig
from pipelines.train import PipelineConfig, RayRunConfig
from tune.probes import error_rates, gate_error_rates, probe_telemetry
from tune.search import SearchConfig, concurrency, expected_trials, placeable_trials, trial_config, trial_demand
from tune.spaces import (NAMED, grid_values, load_space, objective, space_from_dict, to_tune, trial_assignments,
                         validate)

BASE = PipelineConfig(model=ModelConfig.from_name("tiny", kind="patched"))


@pytest.mark.parametrize("name", sorted(NAMED))
def test_every_named_space_is_valid_on_the_default_config(name):
    validate(NAMED[name], BASE)


def test_the_diffusion_space_fixes_a_non_causal_model(tmp_path):
    cfg = trial_config(NAMED["diffusion"], BASE, {"diffusion.noise_schedule": "exp", "train.lr": 0.004},
                       "abc_00001", tmp_path)
    assert cfg.model.causal is False and cfg.diffusion.noise_schedule == "exp" and cfg.train.lr == 0.004
    assert cfg.run.name == "abc_00001" and cfg.run.storage_path == str(tmp_path)


def test_a_bundle_label_expands_to_its_assignments(tmp_path):
    cfg = trial_config(NAMED["representation"], BASE, {"kind": "byte", "train.seed": 1}, "t_00000", tmp_path)
    assert (cfg.model.arch, cfg.model.representation, cfg.train.seed) == ("flat", "byte", 1)
    assignments = trial_assignments(NAMED["representation"], {"kind": "patched-noparity"})
    assert assignments["model.parity"] is False


def test_gate_settings_land_in_the_configs_safety_section(tmp_path):
    cfg = trial_config(NAMED["telemetry"], BASE, {"safety.c_floor": 0.4, "train.lambda_c": 0.1}, "t_0", tmp_path)
    assert cfg.safety.c_floor == 0.4 and cfg.train.lambda_c == 0.1


def test_grid_search_turns_choices_and_ranges_into_grids():
    space = space_from_dict({"params": {"train.lr": {"loguniform": [1e-4, 1e-2]}, "model.n_layers": {"int": [1, 3]},
                                        "train.schedule": {"choice": ["cosine", "constant"]}}})
    grid = to_tune(space, "grid", grid_points=3)
    assert grid["train.lr"]["grid_search"] == pytest.approx([1e-4, 1e-3, 1e-2])
    assert grid["model.n_layers"]["grid_search"] == [1, 2, 3]
    assert grid["train.schedule"]["grid_search"] == ["cosine", "constant"]
    assert expected_trials(SearchConfig(space=space, base=BASE, num_samples=2, search="grid")) == 2 * 3 * 3 * 2
    assert grid_values("uniform", 0.0, 1.0, 1) == [0.0]


def test_a_space_file_in_json_or_yaml_loads_with_the_same_structure(tmp_path):
    data = {"name": "mine", "objective": "val/bpb", "params": {"train.lr": {"uniform": [0.001, 0.002]}}}
    (tmp_path / "s.json").write_text(json.dumps(data))
    (tmp_path / "s.yaml").write_text("name: mine\nobjective: val/bpb\nparams:\n  train.lr: {uniform: [0.001, 0.002]}\n")
    assert load_space(tmp_path / "s.json") == load_space(tmp_path / "s.yaml")


@pytest.mark.parametrize("params, message", [
    ({"train.batch_size": {"uniform": [1, 8]}}, "train.batch_size: uniform samples floats"),
    ({"model.parity": {"int": [0, 1]}}, "model.parity: int samples integers"),
    ({"train.lr": {"between": [1, 2]}}, "train.lr: expected one sampler"),
    ({"lr": {"choice": [0.1]}}, "lr: not a dotted config key"),
    ({"kind": {"bundle": {"byte": {"model.arch": "patched", "model.representation": "byte"}}}}, "kind: value"),
    ({"safety.floor": {"choice": [0.1]}}, "safety.floor.*SafetyConfig has no field"),
])
def test_more_invalid_spaces_are_refused_naming_the_key(params, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        validate(space_from_dict({"params": params}), BASE)


def test_a_space_with_unknown_top_level_keys_or_no_params_is_refused():
    with pytest.raises(ValueError, match="unknown key"):
        space_from_dict({"params": {"train.lr": {"choice": [0.1]}}, "objectiv": "val/bpb"})
    with pytest.raises(ValueError, match="params"):
        space_from_dict({"params": {}})


def test_concurrency_is_what_the_cluster_can_place_and_never_more():
    base = PipelineConfig(run=RayRunConfig(num_workers=2, cpus_per_worker=0.5))
    demand = trial_demand(base, 0.5)
    assert demand == {"CPU": 1.5, "GPU": 0.0}
    assert placeable_trials(demand, {"CPU": 16.0}) == 10
    assert concurrency(demand, {"CPU": 16.0}, None)[0] == 10
    assert concurrency(demand, {"CPU": 16.0}, 3)[0] == 3
    k, line = concurrency(demand, {"CPU": 2.0}, 4)
    assert k == 1 and "not the 4 asked for" in line
    with pytest.raises(ValueError, match="needs 1.5 CPU"):
        concurrency(demand, {"CPU": 1.0}, None)


def test_gpu_trials_are_limited_by_the_gpus():
    base = PipelineConfig(run=RayRunConfig(num_workers=2, cpus_per_worker=1.0, use_gpu=True))
    assert placeable_trials(trial_demand(base, 0.5), {"CPU": 64.0, "GPU": 4.0}) == 2


def test_the_telemetry_objective_adds_the_three_gate_error_rates():
    gate = {"gate/false_block_rate": 0.25, "gate/loop_miss_rate": 0.5, "gate/random_miss_rate": 0.0}
    assert objective(NAMED["telemetry"], {"val/bpb": 3.0}, gate) == pytest.approx(3.75)
    assert objective(NAMED["diffusion"], {"val/elbo_bpb": 4.0}, {}) == 4.0
    assert objective(NAMED["diffusion"], {"val/bpb": 4.0}, {}) is None


@pytest.fixture(scope="module")
def probe_text():
    rng = np.random.default_rng(0)
    words = [b"the", b"king", b"shall", b"speak", b"of", b"love", b"and", b"war", b"my", b"lord"]
    text = b" ".join(words[i] for i in rng.integers(0, len(words), 4000)) + b"."
    return text, bit_marginals(np.frombuffer(text, dtype=np.uint8), parity=True)


def test_the_gate_probes_catch_loops_and_noise_at_the_default_floors(probe_text):
    text, reference = probe_text
    rates = gate_error_rates(text, reference, SafetyConfig(), n_probes=4)
    assert rates["gate/loop_miss_rate"] == 0.0 and rates["gate/random_miss_rate"] == 0.0


def test_a_burn_in_longer_than_a_probe_stream_misses_everything(probe_text):
    text, reference = probe_text
    rates = gate_error_rates(text, reference, SafetyConfig(burn_in=4), n_probes=4)
    assert rates == {"gate/false_block_rate": 0.0, "gate/loop_miss_rate": 1.0, "gate/random_miss_rate": 1.0,
                     "gate/n_probes": 12.0}


def test_floors_above_real_text_block_it(probe_text):
    text, reference = probe_text
    assert gate_error_rates(text, reference, SafetyConfig(c_floor=1.0), n_probes=4)["gate/false_block_rate"] == 1.0


def test_probe_telemetry_scored_per_setting_equals_measuring_each_setting(probe_text):
    text, reference = probe_text
    telemetry = probe_telemetry(text, reference, n_probes=4, seed=3)
    for safety in (SafetyConfig(), SafetyConfig(c_floor=0.9, s_floor=0.9), SafetyConfig(decay=0.6, burn_in=2),
                   SafetyConfig(c_floor=1.0)):
        assert error_rates(telemetry, safety) == gate_error_rates(text, reference, safety, n_probes=4, seed=3)


def test_raising_a_floor_never_lowers_the_false_block_rate(probe_text):
    text, reference = probe_text
    telemetry = probe_telemetry(text, reference, n_probes=4)
    rates = [error_rates(telemetry, SafetyConfig(c_floor=f, s_floor=0.0))["gate/false_block_rate"]
             for f in (0.0, 0.5, 0.8, 0.95, 1.0)]
    assert rates == sorted(rates) and rates[0] == 0.0 and rates[-1] == 1.0
