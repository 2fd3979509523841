"""Shared plumbing of the benchmark scripts: machine description, corpus path, JSON-lines output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Optional

import torch

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def machine() -> dict[str, Any]:
    """Where and when a measurement was taken."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"machine": platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": device, "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def load_shakespeare() -> bytes:
    if not SHAKESPEARE.is_file():
        raise SystemExit(f"{SHAKESPEARE} not found: the benchmarks read tinyshakespeare from ../shared/data")
    return SHAKESPEARE.read_bytes()


def emit(record: dict[str, Any], out: Optional[Path]) -> None:
    """Print one JSON line (and append it to `out`)."""
    line = json.dumps(record | machine(), sort_keys=True)
    print(line, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(line + "\n")


CONTENDERS = ("byte", "flat", "patched")


def contender_config(name: str, preset: str, context_bytes: int, **overrides):
    """The ModelConfig of a race contender, its positional table sized to the benchmark's context."""
    from bitlm.config import ModelConfig

    probe = ModelConfig.from_name(preset, kind=name, **overrides)
    return ModelConfig.from_name(preset, kind=name, **overrides, max_positions=context_bytes * probe.positions_per_byte)


def with_recipe(exp, recipe: str, extra: list[str] | tuple[str, ...] = (), strategy: str | None = None):
    """`exp` (an ExperimentConfig) under a named recipe of bitlm/recipes.py, then the `extra` dotted overrides."""
    from bitlm.config import apply_overrides
    from bitlm.recipes import recipe_overrides

    return apply_overrides(exp, list(recipe_overrides(recipe, strategy, exp.model.arch)) + list(extra))


def recipe_model(cfg, recipe: str, extra: list[str] | tuple[str, ...] = ()):
    """A ModelConfig under the model.* assignments of a recipe and of `extra` (what sampling benchmarks need)."""
    from bitlm.config import ExperimentConfig, apply_overrides
    from bitlm.recipes import recipe_overrides

    model_sets = [o for o in list(recipe_overrides(recipe, arch=cfg.arch)) + list(extra) if o.startswith("model.")]
    return apply_overrides(ExperimentConfig(model=cfg), model_sets).model


def race_shape_arguments(parser, *, extra: tuple[tuple[str, dict], ...] = ()) -> None:
    """--preset, --batch-size, --context-bytes (the races' small 128 x 8), `extra`, --threads and --out."""
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context-bytes", type=int, default=128)
    for flag, options in extra:
        parser.add_argument(flag, **options)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path)


def best_seconds(fn, repeats: int) -> float:
    """Fastest wall time of `repeats` calls of fn."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
