"""Options and config assembly shared by the training commands."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Optional

import click

from ..config import (MODEL_KINDS, ExperimentConfig, ModelConfig, NoiseSchedule, Preset, TrainConfig, apply_overrides,
                      from_dict)
from ..recipes import ARCH_RECIPES, DEFAULT_RECIPE, RECIPES, recipe_overrides
from ..renames import current_key

DEFAULT_KIND = "patched"  # best bits per byte per second of the three (BENCHMARKS.md, quality race)


def build_experiment(preset: str, kind: str, config_file: Optional[str], sets: tuple[str, ...],
                     minutes: Optional[float], steps: Optional[int], *, cls: type = ExperimentConfig,
                     defaults: tuple[str, ...] = (), recipe: str = DEFAULT_RECIPE,
                     data_dir: Optional[str] = None):
    """Preset of a kind + recipe (or JSON file) -> `defaults` -> --minutes/--steps -> --set, in that order.

    `cls` is ExperimentConfig for local runs, or pipelines.train.PipelineConfig (adds `run`) for Ray runs.
    A --config file is a whole experiment: no recipe is applied to it. Without a --config and without
    an assignment to train.context_bytes, training runs at the model's own context (the one it is
    scored and sampled at), cut to the window of the corpus at `data_dir` when that is shorter.
    """
    at_model_context = not config_file and not _assigns("train.context_bytes", tuple(defaults) + tuple(sets))
    try:
        if config_file:
            cfg = config_from_file(cls, config_file)
        else:
            # at the model's context: a placeholder of 2 bytes (the least) fits whatever max_positions --set
            # gives, and is replaced below once the model is known
            train = TrainConfig(context_bytes=2) if at_model_context else TrainConfig()
            base = cls(model=ModelConfig.from_name(preset, kind=kind), train=train)
            # the strategy picks the recipe's fallbacks (FSDP2 cannot run Muon) and the architecture its own
            # options: read both from the config that the later assignments make, so old key names
            # (run.strategy) count too
            later = apply_overrides(base, tuple(defaults) + tuple(sets))
            cfg = apply_overrides(base, recipe_overrides(recipe, later.parallel.strategy, later.model.arch)
                                  + tuple(defaults))
        if minutes is not None:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(
                cfg.train, max_seconds=minutes * 60.0, max_steps=steps or 10_000_000))
        elif steps is not None:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=steps))
        cfg = apply_overrides(cfg, sets)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    return _at_model_context(cfg, corpus_window(data_dir) if data_dir else None) if at_model_context else cfg


def corpus_window(data_dir) -> int:
    """The window in bytes of the prepared corpus at `data_dir` (--data); a bad --data is a usage error."""
    from ..data import read_manifest

    try:
        return read_manifest(Path(data_dir))["window_bytes"]
    except (OSError, ValueError) as err:
        raise click.BadParameter(str(err), param_hint="--data") from None


def _assigns(key: str, assignments: tuple[str, ...]) -> bool:
    return any(current_key(item.split("=", 1)[0].strip()) == key for item in assignments)


def _at_model_context(cfg, window: Optional[int]):
    """`cfg` training at its model's context, or at the corpus's shorter windows (said on stderr).

    Why not TrainConfig's 64 bytes: a model trained on windows shorter than its context scores worse at
    that context than one trained on it with a third of the steps (BENCHMARKS.md, "The demo").
    """
    context = cfg.model.context_bytes
    if window is not None and window < context:
        click.echo(f"training at {window}-byte windows, the corpus's (the model takes {context} bytes; "
                   "prepare with a larger --window-bytes to train at the full context)", err=True)
        context = window
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, context_bytes=context))


def config_from_file(cls: type, path: str):
    """A `cls` config from a --config JSON file; every error is one ValueError line naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:  # ValueError: malformed JSON or not UTF-8
        raise ValueError(f"{path}: not a readable JSON config ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with sections model/train/..., got {type(data).__name__}")
    if "run" in data and "run" not in {f.name for f in dataclasses.fields(cls)}:
        # a Ray run's file (a search's best_config.json, pipelines/configs/*.json) trains locally too:
        # its `run` section says where and how Ray runs it, which --local and --data replace
        data = {k: v for k, v in data.items() if k != "run"}
    try:
        return from_dict(cls, data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _recipe_help() -> str:
    def described(name: str) -> str:
        extra = "".join(f" ({arch} also: {' '.join(sets)})" for arch, sets in ARCH_RECIPES.get(name, {}).items())
        return f"{name}: {' '.join(RECIPES[name]) or 'the dataclass defaults'}{extra}"

    listed = "; ".join(described(name) for name in RECIPES)
    return f"Training recipe applied on top of the preset, before --set ({listed}). Ignored with --config."


def model_options(fn):
    """--preset, --arch, --recipe, --config, --set, --minutes, --steps."""
    options = [
        click.option("--preset", default="small", show_default=True, type=click.Choice(typing.get_args(Preset)),
                     help="Model size preset (see ModelConfig.from_name)."),
        click.option("--arch", "kind", default=DEFAULT_KIND, show_default=True, type=click.Choice(sorted(MODEL_KINDS)),
                     help="patched: bit model with a byte-rate global transformer and a per-bit local decoder; "
                          "flat: one transformer position per bit (the seeds' design); "
                          "byte: the byte-level baseline with the same backbone."),
        click.option("--recipe", default=DEFAULT_RECIPE, show_default=True, type=click.Choice(sorted(RECIPES)),
                     help=_recipe_help()),
        click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                     help="ExperimentConfig JSON (as written to <out>/config.json); replaces --preset."),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help="Override a config field by dotted key, e.g. --set model.n_layers=8 "
                          "--set train.lr=1e-3 --set model.reversible=true. Repeatable."),
        click.option("--minutes", type=float, default=None, help="Wall-clock training budget (time-based LR schedule)."),
        click.option("--steps", type=int, default=None, help="Optimizer steps (train.max_steps)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def diffusion_options(fn):
    """--diffusion, --noise-schedule, --diffusion-steps (and --diffusion-curriculum for training)."""
    options = [
        click.option("--diffusion", is_flag=True, help="Masked-diffusion (non-causal) mode instead of next-bit."),
        click.option("--noise-schedule", type=click.Choice(typing.get_args(NoiseSchedule)), default=None,
                     help="Mask-rate schedule m(t) [default: cosine]."),
        click.option("--diffusion-steps", type=click.IntRange(min=1), default=None, help="Reverse-diffusion steps when sampling [16]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def diffusion_sets(diffusion: bool, schedule, steps, curriculum: bool = False) -> tuple[str, ...]:
    """The --set assignments the diffusion flags stand for."""
    sets = ["model.causal=false"] if diffusion else []
    if schedule:
        sets.append(f"diffusion.noise_schedule={schedule}")
    if steps is not None:
        sets.append(f"diffusion.steps={steps}")
    if curriculum:
        sets.append("diffusion.curriculum=true")
    return tuple(sets)
