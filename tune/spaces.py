"""Search spaces over the dotted config keys: plain JSON descriptions, validated, turned into Tune samplers here.

A space is what a JSON (or YAML) file holds:

    {"name": "mine", "objective": "val/bpb", "search": "random",
     "fixed": {"model.causal": true},
     "params": {"train.lr": {"loguniform": [1e-4, 1e-2]},
                "model.n_layers": {"int": [2, 6]},
                "diffusion.noise_schedule": {"choice": ["linear", "cosine"]},
                "kind": {"bundle": {"patched": {"model.arch": "patched"}, "byte": {"model.arch": "flat",
                                                                                 "model.representation": "byte"}}}}}

Samplers: `choice` / `grid` (a list of values), `uniform` / `loguniform` ([low, high], floats),
`int` / `logint` ([low, high], inclusive), `bundle` (a label chosen from named sets of dotted
assignments that only make sense together). `objective`: `val/bpb`, `val/elbo_bpb` (diffusion)
or `bpb+gate` (val bpb plus `penalty_weight` times the safety gate's three error rates).
Keys `safety.*` are the SafetyGate settings (the config's `safety` section).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from bitlm.config import apply_overrides

Objective = Literal["val/bpb", "val/elbo_bpb", "bpb+gate"]
Search = Literal["random", "grid"]
SAMPLERS = ("choice", "grid", "uniform", "loguniform", "int", "logint", "bundle")
OBJECTIVES = ("val/bpb", "val/elbo_bpb", "bpb+gate")
_SPACE_KEYS = {"name", "description", "objective", "search", "fixed", "params", "penalty_weight"}


@dataclass(frozen=True, kw_only=True)
class Space:
    """A named search space: sampled params, fixed overrides, the objective (always minimised)."""

    name: str
    params: dict[str, dict[str, Any]]
    objective: Objective = "val/bpb"
    description: str = ""
    search: Search = "random"  # the default search of the space; `bitlm tune --search` overrides it
    fixed: dict[str, Any] = field(default_factory=dict)  # dotted assignments applied to every trial
    penalty_weight: float = 1.0  # bpb+gate: bits per byte charged per unit of each gate error rate

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_params(self, params: dict[str, dict[str, Any]]) -> "Space":
        """The same space with `params` added (or replacing searched keys of the same name)."""
        return dataclasses.replace(self, params={k: v for k, v in self.params.items() if k not in params} | params)


NAMED: dict[str, Space] = {
    "diffusion": Space(
        name="diffusion", objective="val/elbo_bpb",
        description="masked-diffusion mode (non-causal): noise schedule, sampling steps, curriculum, "
                    "learning rate, warm-up and dropout; objective val ELBO bits per byte (an upper bound)",
        fixed={"model.causal": False},
        params={"diffusion.noise_schedule": {"choice": ["linear", "cosine", "exp", "loglinear"]},
                "diffusion.steps": {"choice": [4, 8, 16, 32]},
                "diffusion.curriculum": {"choice": [False, True]},
                "train.lr": {"loguniform": [1e-3, 1e-2]},
                "train.warmup_steps": {"choice": [0, 10, 50]},
                "model.dropout": {"uniform": [0.0, 0.1]}}),
    "telemetry": Space(
        name="telemetry", objective="bpb+gate",
        description="K/C/S regularisers (train.lambda_k/c/s) and the safety gate's floors, EMA decay and "
                    "burn-in; objective val bpb + penalty_weight x (false-block rate on held-out text + "
                    "miss rate on repetition loops + miss rate on random bytes), each also reported",
        fixed={"model.causal": True},
        params={"train.lambda_k": {"uniform": [0.0, 0.3]},
                "train.lambda_c": {"uniform": [0.0, 0.3]},
                "train.lambda_s": {"uniform": [0.0, 0.3]},
                "safety.c_floor": {"uniform": [0.1, 0.6]},
                "safety.s_floor": {"uniform": [0.2, 0.9]},
                "safety.decay": {"uniform": [0.0, 0.9]},
                "safety.burn_in": {"int": [0, 4]}}),
    "representation": Space(
        name="representation", objective="val/bpb", search="grid",
        description="bit model (patched) with parity on or off vs the byte baseline, two seeds each, at "
                    "equal wall-clock per trial (--minutes-per-trial); objective val bpb",
        fixed={"model.causal": True},
        params={"kind": {"bundle": {
                    "patched-parity": {"model.arch": "patched", "model.representation": "bit", "model.parity": True},
                    "patched-noparity": {"model.arch": "patched", "model.representation": "bit",
                                         "model.parity": False},
                    "byte": {"model.arch": "flat", "model.representation": "byte", "model.parity": True}}},
                "train.seed": {"choice": [0, 1]}}),
}


def load_space(name_or_path: str | Path) -> Space:
    """A named space (`diffusion`, `telemetry`, `representation`) or one read from a .json/.yaml file."""
    if str(name_or_path) in NAMED:
        return NAMED[str(name_or_path)]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"space {str(name_or_path)!r}: neither a named space ({', '.join(NAMED)}) nor a file")
    import yaml  # a dependency of ray

    try:
        text = path.read_text()
        data = yaml.safe_load(text) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except (OSError, ValueError, yaml.YAMLError) as err:  # ValueError: malformed JSON, not UTF-8
        raise ValueError(f"space {path}: not readable ({err})") from None
    return space_from_dict(data, default_name=path.stem)


def space_from_dict(data: Any, default_name: str = "custom") -> Space:
    """A Space from its JSON form; structural errors name the offending key."""
    if not isinstance(data, dict):
        raise ValueError(f"space {default_name}: expected an object with 'params', got {type(data).__name__}")
    unknown = sorted(set(data) - _SPACE_KEYS)
    if unknown:
        raise ValueError(f"space {default_name}: unknown key(s) {unknown}; known: {sorted(_SPACE_KEYS)}")
    name = data.get("name", default_name)
    params = data.get("params")
    if not isinstance(params, dict) or not params:
        raise ValueError(f"space {name}: params: expected a non-empty object of dotted key -> sampler")
    fixed = data.get("fixed", {})
    if not isinstance(fixed, dict):
        raise ValueError(f"space {name}: fixed: expected an object of dotted key -> value")
    objective = data.get("objective", "val/bpb")
    if objective not in OBJECTIVES:
        raise ValueError(f"space {name}: objective: must be one of {list(OBJECTIVES)}, got {objective!r}")
    search = data.get("search", "random")
    if search not in ("random", "grid"):
        raise ValueError(f"space {name}: search: must be 'random' or 'grid', got {search!r}")
    weight = data.get("penalty_weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"space {name}: penalty_weight: must be a finite number >= 0, got {weight!r}")
    return Space(name=str(name), params=params, objective=objective, description=str(data.get("description", "")),
                 search=search, fixed=fixed, penalty_weight=float(weight))


def render(value: Any) -> str:
    """A value as the text of a `--set key=value` assignment."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def sampler_of(key: str, spec: Any) -> tuple[str, Any]:
    """(sampler kind, its argument) of one searched key, e.g. ("loguniform", [1e-4, 1e-2])."""
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
        raise ValueError(f"{key}: expected one sampler of {list(SAMPLERS)}, e.g. {{\"choice\": [1, 2]}}, got {spec!r}")
    return next(iter(spec.items()))


def _range(key: str, kind: str, bounds: Any) -> tuple[Any, Any]:
    integral = kind in ("int", "logint")
    if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
        raise ValueError(f"{key}: {kind} needs [low, high], got {bounds!r}")
    for bound in bounds:
        numeric = isinstance(bound, int) if integral else isinstance(bound, (int, float))
        if isinstance(bound, bool) or not numeric or (not integral and not math.isfinite(bound)):
            raise ValueError(f"{key}: {kind} bounds must be {'integers' if integral else 'finite numbers'}, "
                             f"got {bounds!r}")
    low, high = bounds
    if low > high:
        raise ValueError(f"{key}: {kind} range has low > high ({low} > {high})")
    if kind in ("loguniform", "logint") and low <= 0:
        raise ValueError(f"{key}: {kind} range needs low > 0, got {low}")
    return (low, high) if integral else (float(low), float(high))


def _check_assignments(assignments: dict[str, Any], base: Any) -> Any:
    """Apply dotted assignments to `base`; the config's own validation names the key of a bad one."""
    return apply_overrides(base, assignment_strings(assignments))


def _values_to_check(key: str, kind: str, spec: Any) -> list[dict[str, Any]]:
    """The assignments that stand for every value a sampler can produce (choices, range ends)."""
    if kind in ("choice", "grid"):
        if not isinstance(spec, list) or not spec:
            raise ValueError(f"{key}: {kind} needs a non-empty list of values, got {spec!r}")
        return [{key: v} for v in spec]
    if kind == "bundle":
        if not isinstance(spec, dict) or not spec:
            raise ValueError(f"{key}: bundle needs a non-empty object of label -> {{dotted key: value}}")
        for label, sets in spec.items():
            if not isinstance(sets, dict) or not sets:
                raise ValueError(f"{key}: bundle {label!r} needs a non-empty object of dotted key -> value")
        return list(spec.values())
    low, high = _range(key, kind, spec)
    return [{key: low}, {key: high}]


def _declared_type(base: Any, key: str) -> Any:
    """The annotated type of the config field a dotted key names (None when the key names none)."""
    node = base
    *sections, name = key.split(".")
    for section in sections:
        node = getattr(node, section, None)
        if node is None or not dataclasses.is_dataclass(node):
            return None
    if not dataclasses.is_dataclass(node) or name not in {f.name for f in dataclasses.fields(node)}:
        return None
    return typing.get_type_hints(type(node))[name]


def _check_range_type(key: str, kind: str, base: Any) -> None:
    """A float range on an int field would sample 2.7 for a batch size: refuse it up front."""
    tp = _declared_type(base, key)
    if tp is None:
        return  # an unknown key: the value check names it
    accepted = set(typing.get_args(tp)) or {tp}
    if kind in ("uniform", "loguniform") and float not in accepted:
        raise ValueError(f"{key}: {kind} samples floats but the field is {tp}; use int / logint / choice")
    if kind in ("int", "logint") and not accepted & {int, float}:
        raise ValueError(f"{key}: {kind} samples integers but the field is {tp}; use choice")


def validate(space: Space, base: Any) -> None:
    """Raise ValueError naming the key unless every value the space can produce makes a valid config of `base`.

    Checked: known dotted keys, sampler shapes, empty choices, low > high, log ranges with
    low <= 0, and every choice / bundle / range end applied to `base` with the fixed assignments
    (so the config's own validation judges it). Runs before Ray starts anything.
    """
    prefix = f"space {space.name}: "
    try:
        _check_assignments(space.fixed, base)
    except ValueError as err:
        raise ValueError(f"{prefix}fixed: {err}") from None
    for key, raw in space.params.items():
        try:
            kind, spec = sampler_of(key, raw)
            if kind != "bundle" and "." not in key:
                raise ValueError(f"{key}: not a dotted config key (e.g. train.lr); only a bundle takes a plain label")
            if kind == "bundle" and "." in key:
                raise ValueError(f"{key}: a bundle's name is a label without dots (e.g. kind)")
            if kind in ("uniform", "loguniform", "int", "logint"):
                _check_range_type(key, kind, base)
            for assignment in _values_to_check(key, kind, spec):
                try:
                    _check_assignments(space.fixed | assignment, base)
                except ValueError as err:
                    shown = assignment if kind == "bundle" else next(iter(assignment.values()))
                    message = str(err)
                    raise ValueError(message if message.startswith(key) else f"{key}: value {shown!r}: {message}")
        except ValueError as err:
            raise ValueError(f"{prefix}{err}") from None


def to_tune(space: Space, search: Optional[Search] = None, grid_points: int = 3) -> dict[str, Any]:
    """The Tuner's param_space: one Tune sampler (or grid) per searched key."""
    from ray import tune

    search = search or space.search
    out: dict[str, Any] = {}
    for key, raw in space.params.items():
        kind, spec = sampler_of(key, raw)
        if kind == "bundle":
            spec, kind = list(spec), "choice"
        if kind == "grid" or (search == "grid" and kind == "choice"):
            out[key] = tune.grid_search(list(spec))
        elif kind == "choice":
            out[key] = tune.choice(list(spec))
        elif search == "grid":
            out[key] = tune.grid_search(grid_values(kind, *_range(key, kind, spec), grid_points))
        elif kind == "uniform":
            out[key] = tune.uniform(*_range(key, kind, spec))
        elif kind == "loguniform":
            out[key] = tune.loguniform(*_range(key, kind, spec))
        elif kind == "int":
            low, high = _range(key, kind, spec)
            out[key] = tune.randint(low, high + 1)  # Tune's upper bound is exclusive
        else:
            low, high = _range(key, kind, spec)
            out[key] = tune.lograndint(low, high + 1)
    return out


def grid_values(kind: str, low: float, high: float, n: int) -> list:
    """`n` evenly spaced points of a range (geometric for log ranges; distinct integers for int ranges)."""
    if n == 1 or low == high:
        points = [low]
    elif kind in ("loguniform", "logint"):
        points = [low * (high / low) ** (i / (n - 1)) for i in range(n)]
    else:
        points = [low + (high - low) * i / (n - 1) for i in range(n)]
    if kind in ("int", "logint"):
        return sorted({int(round(p)) for p in points})
    return [float(p) for p in points]


def trial_assignments(space: Space, trial_config: dict[str, Any]) -> dict[str, Any]:
    """The dotted assignments of one trial: fixed ones, then the sampled values (bundles expanded)."""
    out = dict(space.fixed)
    for key, value in trial_config.items():
        if key not in space.params:
            continue
        kind, spec = sampler_of(key, space.params[key])
        if kind == "bundle":
            out.update(spec[value])
        else:
            out[key] = value.item() if hasattr(value, "item") else value  # numpy scalars from Tune
    return out


def assignment_strings(assignments: dict[str, Any]) -> list[str]:
    """The `--set key=value` strings of dotted assignments."""
    return [f"{key}={render(value)}" for key, value in assignments.items()]


def describe(space: Space) -> str:
    """One line per searched key, for --help and the search's opening lines."""
    lines = [f"{space.name}: {space.description}" if space.description else space.name]
    for key, raw in space.params.items():
        kind, spec = sampler_of(key, raw)
        shown = list(spec) if kind == "bundle" else spec
        lines.append(f"  {key}: {kind} {json.dumps(shown)}")
    return "\n".join(lines)


METRIC = "objective"  # what Tune minimises; the space says what it stands for


def objective(space: Space, metrics: dict[str, Any], gate: dict[str, float]) -> Optional[float]:
    """The space's objective from one evaluation (None when the evaluation lacks its score)."""
    score = metrics.get("val/elbo_bpb" if space.objective == "val/elbo_bpb" else "val/bpb")
    if not isinstance(score, (int, float)):
        return None
    if space.objective != "bpb+gate":
        return float(score)
    errors = gate["gate/false_block_rate"] + gate["gate/loop_miss_rate"] + gate["gate/random_miss_rate"]
    return float(score) + space.penalty_weight * errors
