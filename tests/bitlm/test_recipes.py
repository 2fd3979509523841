"""Named recipes: what the commands build from a preset, the FSDP2 fallback, and --set winning over them."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from bitlm.cli import main
from bitlm.cli.options import build_experiment
from bitlm.config import ExperimentConfig, ModelConfig, TrainConfig, apply_overrides, to_dict
from bitlm.recipes import ARCH_RECIPES, DEFAULT_RECIPE, RECIPES, recipe_overrides


def test_default_recipe_is_applied_on_top_of_the_preset():
    cfg = build_experiment("tiny", "patched", None, (), None, None)
    expected = apply_overrides(ExperimentConfig(model=ModelConfig.from_name("tiny", kind="patched")),
                               RECIPES[DEFAULT_RECIPE] + ARCH_RECIPES[DEFAULT_RECIPE]["patched"]
                               + ("train.context_bytes=128",))  # the preset's context, not TrainConfig's
    assert cfg == expected
    assert RECIPES[DEFAULT_RECIPE], "the default recipe changes something"
    assert cfg != ExperimentConfig(model=ModelConfig.from_name("tiny", kind="patched"))


def test_original_recipe_is_the_dataclass_defaults():
    cfg = build_experiment("small", "byte", None, ("train.context_bytes=64",), None, None, recipe="original")
    assert cfg == ExperimentConfig(model=ModelConfig.from_name("small", kind="byte"))
    assert cfg.train == TrainConfig()


def test_set_overrides_win_over_the_recipe():
    cfg = build_experiment("tiny", "byte", None, ("train.optimizer=adamw", "model.input_conv=0"), None, None,
                           recipe="tuned")
    assert cfg.train.optimizer == "adamw" and cfg.model.input_conv == 0


def test_the_patched_models_own_options_go_to_it_alone():
    patched = build_experiment("tiny", "patched", None, (), None, None).model
    assert patched.tree_shared_bits and patched.byte_table and patched.byte_softmax and patched.local_d_ff == 0
    assert patched.known_parity
    for kind in ("byte", "flat"):
        # the other models keep the dataclass defaults of options they do not have
        model = build_experiment("tiny", kind, None, (), None, None).model
        assert not (model.tree_shared_bits or model.byte_table or model.byte_softmax or model.known_parity)
        assert model.local_d_ff == ModelConfig().local_d_ff
        assert model.input_conv == 4  # while the common part of the recipe still applies
    assert not any("tree_shared_bits" in a for a in recipe_overrides("tuned"))
    assert "model.byte_table=true" in recipe_overrides("tuned", arch="patched")
    # a later --set still wins, and the original recipe adds nothing for any architecture
    assert build_experiment("tiny", "patched", None, ("model.local_d_ff=64",), None, None).model.local_d_ff == 64
    assert recipe_overrides("original", arch="patched") == ()


def test_fsdp_strategy_swaps_muon_for_adamw():
    assert "train.optimizer=muon" in recipe_overrides("tuned")
    swapped = recipe_overrides("tuned", "fsdp")
    assert "train.optimizer=adamw" in swapped and "train.optimizer=muon" not in swapped
    cfg = build_experiment("tiny", "patched", None, ("parallel.strategy=fsdp",), None, None)
    assert cfg.parallel.strategy == "fsdp" and cfg.train.optimizer == "adamw"
    # the rest of the recipe still applies
    assert cfg.model == build_experiment("tiny", "patched", None, (), None, None).model


def test_the_fallback_follows_the_last_strategy_assignment_and_old_key_names():
    sets = ("train.lr=1e-3", "parallel.strategy=ddp", " parallel.strategy = fsdp ")
    assert build_experiment("tiny", "patched", None, sets, None, None).train.optimizer == "adamw"
    assert build_experiment("tiny", "patched", None, ("train.lr=1e-3",), None, None).train.optimizer == "muon"
    # run.strategy is the old name of parallel.strategy (bitlm/renames.py)
    assert build_experiment("tiny", "patched", None, ("run.strategy=fsdp",), None, None).train.optimizer == "adamw"


def test_unknown_recipe_names_the_choices():
    with pytest.raises(click.BadParameter, match="recipe: unknown 'fast'.*original.*tuned"):
        build_experiment("tiny", "patched", None, (), None, None, recipe="fast")


def test_config_file_is_not_given_a_recipe(tmp_path):
    path = tmp_path / "config.json"
    original = ExperimentConfig(model=ModelConfig.from_name("tiny", kind="byte"))
    path.write_text(json.dumps(to_dict(original)))
    assert build_experiment("small", "patched", str(path), (), None, None) == original


def test_every_recipe_is_a_valid_config_for_every_kind():
    for name in RECIPES:
        for kind in ("patched", "flat", "byte"):
            for causal in ("true", "false"):
                build_experiment("tiny", kind, None, (f"model.causal={causal}",), None, None, recipe=name)


def test_train_help_lists_the_recipes():
    result = CliRunner().invoke(main, ["train", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "--recipe" in result.output and "original" in result.output and "tuned" in result.output
    assert "patched also: model.tree_shared_bits=true" in " ".join(result.output.split())
