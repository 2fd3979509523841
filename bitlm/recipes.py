"""Named training recipes: dotted overrides that the commands apply on top of a preset.

A recipe is a plain tuple of `--set` assignments, so it is visible (`bitlm train --help` lists it),
overridable (a later --set wins) and recorded in each run's config.json like any other option. The
dataclass defaults of ModelConfig / TrainConfig stay the original design, so every config.json written
before the recipes existed loads into the same model it described.
"""

from __future__ import annotations

# "tuned": the winners of benchmarks/bench_recipe.py, equal for the byte baseline and the bit models
# (BENCHMARKS.md, "Recipe search"). "original": the design before that search.
RECIPES: dict[str, tuple[str, ...]] = {
    "tuned": (
        "train.optimizer=muon",             # the largest single lever: -14% (byte) / -20% (patched) bpb
        "model.position_encoding=rotary",
        "model.input_conv=4",               # causal depthwise mix of the last 4 positions' inputs
    ),
    # Together -15.5% (byte) / -22% (patched) at 90 s on `small`. RMSNorm, QK-norm, zero-init, ReLU²,
    # the wsd schedule, batch 32 and context 128 moved it by less than the seed spread or made it
    # worse on top of these three, so they stay options, not defaults.
    "original": (),
}
DEFAULT_RECIPE = "tuned"

# what a recipe adds for one architecture: options that only that model has (BENCHMARKS.md, "Bit structure
# at 10 minutes"), kept out of the other models' config.json where they would mean nothing
ARCH_RECIPES: dict[str, dict[str, tuple[str, ...]]] = {
    "tuned": {
        "patched": (
            "model.tree_shared_bits=true",  # tree nodes share a vector per earlier bit's value across bytes
            "model.local_d_ff=0",           # the nodes read the normed global state, as the byte head does
            "model.byte_table=true",        # the encoder adds a learned vector per whole byte
            "model.byte_softmax=true",      # every bit read from one softmax over the byte's patterns
            "model.known_parity=true",      # that softmax over the 256 data patterns; the parity bit certain
        ),
    },
}

# options a recipe sets that a strategy refuses, and what the recipe falls back to there
_FALLBACKS: dict[str, dict[str, str]] = {
    "fsdp": {"train.optimizer": "adamw"},  # Muon needs whole weight matrices; FSDP2 shards them
}


def recipe_overrides(name: str, strategy: str | None = None, arch: str | None = None) -> tuple[str, ...]:
    """The assignments of recipe `name` for model.arch `arch` (None: only those common to every
    architecture), with what `strategy` (parallel.strategy) cannot run swapped out."""
    if name not in RECIPES:
        raise ValueError(f"recipe: unknown {name!r}; choose from {sorted(RECIPES)}")
    fallback = _FALLBACKS.get(strategy or "", {})
    out = []
    for assignment in RECIPES[name] + ARCH_RECIPES.get(name, {}).get(arch or "", ()):
        key = assignment.split("=", 1)[0]
        out.append(f"{key}={fallback[key]}" if key in fallback else assignment)
    return tuple(out)

