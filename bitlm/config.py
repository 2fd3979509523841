"""Frozen, JSON-round-trippable configs with named presets and dotted-key overrides."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from .fields import (check, check_choice, check_fields, check_range, check_value, field_types, is_int,
                     is_real, show, takes_float)
from .renames import accepts_old_names, upgrade_document

Arch = Literal["flat", "patched"]
Representation = Literal["bit", "byte"]
LRSchedule = Literal["cosine", "onecycle", "constant", "wsd"]
OptimizerName = Literal["adamw", "muon"]  # bitlm.optim.build_optimizer
Precision = Literal["auto", "fp32", "bf16"]
NoiseSchedule = Literal["linear", "cosine", "exp", "loglinear"]
StrategyName = Literal["single", "ddp", "fsdp", "pipeline"]  # bitlm.strategy.STRATEGIES
PipelineSchedule = Literal["gpipe", "1f1b"]  # bitlm.pipelining.PIPELINE_SCHEDULES
Preset = Literal["tiny", "small", "base"]  # the keys of MODEL_PRESETS


# Upper bounds turn a typo (an extra zero or two in d_model or batch_size) into an error naming the
# field instead of an out-of-memory crash minutes later; each is far above what fits on one
# accelerator today (the base preset: d_model 512, 8 layers, at most 4608 positions).
MODEL_BOUNDS: dict[str, tuple[int, int]] = {
    "d_model": (1, 65_536), "n_heads": (1, 1024), "n_layers": (1, 1024), "d_ff": (1, 1_048_576),
    "max_positions": (1, 2 ** 24), "local_d_ff": (0, 1_048_576), "n_local_layers": (0, 1024), "n_streams": (1, 1024),
}
MAX_BATCH_SIZE = 1_000_000
MAX_INPUT_CONV = 64  # model.input_conv: a local mix of recent inputs, not a second long-range path
# fit derives generator seeds as seed * 1_000_003 + index; below 2**32 those stay inside
# torch.manual_seed's documented range [-2**63, 2**64 - 1], and every seed is one numpy accepts.
MAX_SEED = 2 ** 32 - 1


@accepts_old_names("model")
@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape and options of a BitTransformerLM."""

    arch: Arch = "flat"
    representation: Representation = "bit"
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4
    d_ff: int = 512
    max_positions: int = 2304  # transformer positions: bits for the flat bit model, bytes otherwise
    dropout: float = 0.0
    parity: bool = True
    causal: bool = True
    reversible: bool = False
    chunk_size: Optional[int] = None  # block-local attention window, in positions
    full_attn_logging: bool = False  # return (B, H, T, T) attention maps with telemetry
    act: bool = False  # adaptive computation time halting over layers
    act_threshold: float = 0.99
    # arch="patched": the local decoder that predicts each byte's bits from the byte-rate global state
    # width of the per-byte features z that every bit's tree node reads, z = A norm(h); 0: no A, the
    # nodes read norm(h) itself (d_model wide), one linear map from the state to the logits as in the byte head
    local_d_ff: int = 128
    n_local_layers: int = 0  # residual MLPs computing z from the global state (run once per byte)
    tree_shared_bits: bool = False  # each tree node's vector also sums vectors per (phase, earlier bit, its value)
    byte_table: bool = False  # the byte encoder adds a learned vector per whole bit pattern (0 for masked bytes)
    # causal models: the bits' conditionals are read from one softmax over the byte's 2^bpb patterns (a
    # non-causal, diffusion model keeps the tree); tree_shared_bits then shares per-bit vectors across patterns
    byte_softmax: bool = False
    # with byte_softmax and parity: the softmax scores the 2^8 data patterns only, and the parity bit,
    # a function of the data bits (bitlm.codec), gets a fixed certain logit: a head as wide as the byte
    # model's. Like byte_softmax it acts where it applies (a causal model with byte_softmax and parity
    # bits) and changes nothing elsewhere, so one recipe serves every patched model
    known_parity: bool = False
    n_streams: int = 1  # 2 for compression-aware training: a learned marker for rows of compressed bits
    # recipes of recent small models (nanoGPT, modded-nanogpt); the defaults are the original design
    norm: Literal["layer", "rms"] = "layer"  # every norm of the model: LayerNorm or RMSNorm
    mlp: Literal["gelu", "relu2", "swiglu"] = "gelu"  # swiglu keeps d_ff as its width: 1.5x the MLP parameters
    qk_norm: bool = False  # RMS-normalise queries and keys per head (learned scale) before attention
    position_encoding: Literal["sinusoidal", "rotary"] = "sinusoidal"  # rotary: q, k rotated, no table added
    zero_init_residual: bool = False  # attention's proj and the MLP's last Linear start at zero
    zero_init_head: bool = False  # the output head starts at zero (patched: z = 0, every node at its bias)
    # kernel, in transformer positions (bits for the flat bit model, bytes otherwise), of a depthwise
    # convolution added to the stack inputs (bitlm.input_conv): causal in causal mode, centred in
    # non-causal (diffusion) mode; 0 = none
    input_conv: int = 0

    def __post_init__(self) -> None:
        check_fields(self, "model.")
        for name, (low, high) in MODEL_BOUNDS.items():
            check_range(getattr(self, name), f"model.{name}", low, high)
        check(self.d_model % self.n_heads == 0, "model.d_model",
               f"must be divisible by model.n_heads={self.n_heads}, got {self.d_model}")
        check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")
        check(self.chunk_size is None or 1 <= self.chunk_size <= 2 ** 24, "model.chunk_size",
               f"must be None or in [1, {2 ** 24}], got {self.chunk_size}")
        check(0.0 < self.act_threshold <= 1.0, "model.act_threshold",
               f"must be in (0, 1], got {self.act_threshold}")
        check(self.position_encoding == "sinusoidal" or self.head_dim % 2 == 0, "model.position_encoding",
              f"'rotary' rotates pairs of features, so model.d_model / model.n_heads must be even, got {self.head_dim}")
        check_range(self.input_conv, "model.input_conv", 0, MAX_INPUT_CONV)
        check(self.arch == "flat" or self.representation == "bit", "model.arch",
               f"'patched' models bits; the byte baseline uses arch='flat' (got representation={self.representation!r})")

    @property
    def bits_per_byte(self) -> int:
        """Bits that encode one byte (9 with parity, 8 without)."""
        return 9 if self.parity else 8

    @property
    def ids_per_byte(self) -> int:
        """Input ids (and output logits) per byte of text: bits for bit models, 1 for the byte baseline."""
        return self.bits_per_byte if self.representation == "bit" else 1

    @property
    def positions_per_byte(self) -> int:
        """Transformer positions spent per byte of text (the patched model runs at byte rate)."""
        return self.bits_per_byte if (self.representation == "bit" and self.arch == "flat") else 1

    @property
    def max_input_ids(self) -> int:
        """Longest id sequence one forward accepts (max_positions positions, in ids)."""
        return self.max_positions * self.ids_per_byte // self.positions_per_byte

    @property
    def context_bytes(self) -> int:
        """Longest text one forward accepts, in bytes."""
        return self.max_input_ids // self.ids_per_byte

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_name(cls, name: str, kind: Optional[str] = None, **overrides: Any) -> "ModelConfig":
        """A named preset (`tiny`, `small`, `base`), optionally of a kind (`patched`, `flat`, `byte`).

        A preset fixes the shape and a context in bytes; max_positions follows from it for the chosen
        architecture (bits for the flat bit model, bytes otherwise) unless given explicitly.
        """
        if name not in MODEL_PRESETS:
            raise ValueError(f"model preset: unknown {name!r}; choose from {sorted(MODEL_PRESETS)}")
        if kind is not None:
            if kind not in MODEL_KINDS:
                raise ValueError(f"model kind: unknown {kind!r}; choose from {sorted(MODEL_KINDS)}")
            overrides = MODEL_KINDS[kind] | overrides
        shape = dict(MODEL_PRESETS[name])
        context_bytes = shape.pop("context_bytes")
        explicit_len = "max_positions" in overrides
        cfg = cls(**(shape | overrides))
        if explicit_len:
            return cfg
        return dataclasses.replace(cfg, max_positions=context_bytes * cfg.positions_per_byte)


# The three model kinds a run chooses between: the byte-patched bit model, the flat bit model of
# the seeds (one position per bit) and the byte baseline (same backbone, 256-way in and out).
MODEL_KINDS: dict[str, dict[str, str]] = {
    "patched": {"arch": "patched", "representation": "bit"},
    "flat": {"arch": "flat", "representation": "bit"},
    "byte": {"arch": "flat", "representation": "byte"},
}

# Shapes plus the context (in bytes) each preset is sized for.
MODEL_PRESETS: dict[Preset, dict[str, int]] = {
    "tiny": {"d_model": 64, "n_heads": 4, "n_layers": 2, "d_ff": 256, "context_bytes": 128},
    "small": {"d_model": 128, "n_heads": 4, "n_layers": 4, "d_ff": 512, "context_bytes": 256},
    "base": {"d_model": 512, "n_heads": 8, "n_layers": 8, "d_ff": 2048, "context_bytes": 512},
}


@accepts_old_names("train")
@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation, schedule, evaluation and checkpoint cadence of one training run."""

    seed: int = 0
    batch_size: int = 16
    context_bytes: int = 64
    grad_accum_steps: int = 1
    max_steps: int = 1000
    max_seconds: Optional[float] = None  # wall-clock budget; the LR schedule follows time when set
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 100
    schedule: LRSchedule = "cosine"  # of the learning rate
    decay_fraction: float = 0.2  # wsd: the last fraction of the run, in which the lr falls linearly to min_lr_ratio
    # muon: torch.optim.Muon for the 2-D weights inside the transformer blocks, AdamW (lr) for the rest;
    # the schedule scales muon_lr by the same factor as lr
    optimizer: OptimizerName = "adamw"
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    grad_clip: float = 1.0
    precision: Precision = "auto"
    compile: bool = False
    log_every_steps: int = 25
    eval_every_steps: int = 200
    n_eval_batches: int = 20
    checkpoint_every_steps: int = 0  # 0: only at the end
    n_checkpoints_kept: int = 2
    # telemetry regularisers: loss += lambda * (1 - metric) on differentiable proxies of K, C, S
    lambda_k: float = 0.0
    lambda_c: float = 0.0
    lambda_s: float = 0.0
    drift_window: int = 5  # evaluations per window of detect_metric_drift on val K/C/S
    drift_threshold: float = 0.2
    # compression-aware multi-task training: the chance that a row is replaced by its RLE-compressed
    # bits, 0 until compress_warmup_steps, then rising linearly to compress_prob over compress_ramp_steps
    compress_prob: float = 0.0
    compress_warmup_steps: int = 0
    compress_ramp_steps: int = 0
    # 4-bit quantization-aware training: the linear layers' weights are fake-quantized in groups of
    # qat_group_size input columns (bitlm.quantization.prepare_qat); `bitlm quantize --int4` converts
    qat: bool = False
    qat_group_size: int = 32

    def __post_init__(self) -> None:
        check_fields(self, "train.")
        check_range(self.seed, "train.seed", 0, MAX_SEED)
        check_range(self.batch_size, "train.batch_size", 1, MAX_BATCH_SIZE)
        for name in ("grad_accum_steps", "max_steps", "log_every_steps", "eval_every_steps", "n_eval_batches",
                     "n_checkpoints_kept"):
            check(getattr(self, name) >= 1, f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        # the upper end is the largest model context (model.max_positions); ExperimentConfig checks the actual one
        check_range(self.context_bytes, "train.context_bytes", 2, MODEL_BOUNDS["max_positions"][1])
        check(self.max_seconds is None or self.max_seconds > 0, "train.max_seconds",
               f"must be None or > 0, got {self.max_seconds}")
        check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        check(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1/beta2", "must be in [0, 1)")
        check(self.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(0.0 < self.decay_fraction <= 1.0, "train.decay_fraction", f"must be in (0, 1], got {self.decay_fraction}")
        check(self.muon_lr > 0, "train.muon_lr", f"must be > 0, got {self.muon_lr}")
        check(0.0 <= self.muon_momentum < 1.0, "train.muon_momentum", f"must be in [0, 1), got {self.muon_momentum}")
        check(self.grad_clip >= 0, "train.grad_clip", f"must be >= 0 (0 disables), got {self.grad_clip}")
        check(self.checkpoint_every_steps >= 0, "train.checkpoint_every_steps",
              f"must be >= 0, got {self.checkpoint_every_steps}")
        for name in ("lambda_k", "lambda_c", "lambda_s"):
            check(getattr(self, name) >= 0, f"train.{name}", f"must be >= 0, got {getattr(self, name)}")
        check(self.drift_window >= 1, "train.drift_window", f"must be >= 1, got {self.drift_window}")
        check(self.drift_threshold >= 0, "train.drift_threshold", f"must be >= 0, got {self.drift_threshold}")
        check(0.0 <= self.compress_prob <= 1.0, "train.compress_prob", f"must be in [0, 1], got {self.compress_prob}")
        for name in ("compress_warmup_steps", "compress_ramp_steps"):
            check(getattr(self, name) >= 0, f"train.{name}", f"must be >= 0, got {getattr(self, name)}")
        check(self.qat_group_size in (32, 64, 128, 256), "train.qat_group_size",
               f"must be 32, 64, 128 or 256, got {self.qat_group_size}")


@dataclass(frozen=True, kw_only=True)
class DiffusionConfig:
    """Masked-diffusion training and sampling (used when model.causal is False)."""

    noise_schedule: NoiseSchedule = "cosine"
    steps: int = 16  # reverse-diffusion steps when sampling
    curriculum: bool = False  # draw heavy noise early in training, uniform by the end

    def __post_init__(self) -> None:
        check_fields(self, "diffusion.")
        check(self.steps >= 1, "diffusion.steps", f"must be >= 1, got {self.steps}")


ExpansionKind = Literal["depth", "width", "context"]


@accepts_old_names("scaling")
@dataclass(frozen=True, kw_only=True)
class ScalingConfig:
    """Progressive scaling: grow the model when validation loss plateaus (bitlm.scaling)."""

    enabled: bool = False
    n_plateau_evals: int = 3  # evaluations per window of the plateau detector
    improve_thresh: float = 0.01  # plateau: relative val-loss improvement between windows below this
    order: str = "depth,width,context"  # expansions cycle through these kinds, comma-separated
    n_added_layers: int = 1  # layers a depth expansion appends
    max_expansions: int = 6
    max_parameters: int = 100_000_000  # no expansion may grow the model past this
    max_context_bytes: int = 4096  # no context expansion past this
    lr_decay: float = 2 ** 0.5  # the base learning rate is divided by this at every expansion
    rewarm_steps: int = 100  # linear learning-rate warm-up after each expansion

    def __post_init__(self) -> None:
        check_fields(self, "scaling.")
        check(self.n_plateau_evals >= 1, "scaling.n_plateau_evals", f"must be >= 1, got {self.n_plateau_evals}")
        check(self.improve_thresh >= 0, "scaling.improve_thresh", f"must be >= 0, got {self.improve_thresh}")
        kinds = self.kinds
        check(len(kinds) >= 1, "scaling.order", "must name at least one of depth, width, context")
        for kind in kinds:
            check_choice(kind, "scaling.order", ExpansionKind)
        check_range(self.n_added_layers, "scaling.n_added_layers", 1, MODEL_BOUNDS["n_layers"][1])
        check(self.max_expansions >= 0, "scaling.max_expansions", f"must be >= 0, got {self.max_expansions}")
        check(self.max_parameters >= 1, "scaling.max_parameters", f"must be >= 1, got {self.max_parameters}")
        check(self.max_context_bytes >= 2, "scaling.max_context_bytes",
               f"must be >= 2, got {self.max_context_bytes}")
        check(self.lr_decay >= 1.0, "scaling.lr_decay", f"must be >= 1, got {self.lr_decay}")
        check(self.rewarm_steps >= 0, "scaling.rewarm_steps", f"must be >= 0, got {self.rewarm_steps}")

    @property
    def kinds(self) -> tuple[str, ...]:
        """The expansion cycle, e.g. ("depth", "width", "context")."""
        return tuple(k.strip() for k in self.order.split(",") if k.strip())


@dataclass(frozen=True, kw_only=True)
class SafetyConfig:
    """Floors, smoothing and retry policy of a SafetyGate (bitlm.safety); the `safety` section of a run."""

    c_floor: float = 0.3  # block when the (smoothed) LZ complexity C falls below this
    s_floor: float = 0.5  # block when the (smoothed) symbiosis S falls below this
    decay: float = 0.0  # EMA weight of the previous value: ema = decay * ema + (1 - decay) * value
    burn_in: int = 0  # observations per stream before the gate may block
    window_bytes: int = 512  # C and S are means over windows of this many bytes (the calibration's size)
    max_retries: int = 2  # safe_sample_with_retry makes at most 1 + max_retries attempts
    backoff_s: float = 0.0  # sleep backoff_s * 2 ** (k - 1) before retry k
    strict: bool = False  # raise SafetyBlocked instead of returning a failed verdict

    def __post_init__(self) -> None:
        # numbers.Real / Integral rather than check_fields: the gate is also built in code from numpy values
        for name in ("c_floor", "s_floor"):
            value = getattr(self, name)
            check(is_real(value) and 0.0 <= value <= 1.0, f"safety.{name}", f"must be in [0, 1], got {value!r}")
        check(is_real(self.decay) and 0.0 <= self.decay < 1.0, "safety.decay",
               f"must be in [0, 1), got {self.decay!r}")
        check(is_int(self.burn_in) and self.burn_in >= 0, "safety.burn_in",
               f"must be an integer >= 0, got {self.burn_in!r}")
        check(is_int(self.window_bytes) and self.window_bytes >= 1, "safety.window_bytes",
               f"must be an integer >= 1, got {self.window_bytes!r}")
        check(is_int(self.max_retries) and self.max_retries >= 0, "safety.max_retries",
               f"must be an integer >= 0, got {self.max_retries!r}")
        check(is_real(self.backoff_s) and 0.0 <= self.backoff_s < math.inf, "safety.backoff_s",
               f"must be a finite number >= 0, got {self.backoff_s!r}")
        check(isinstance(self.strict, bool), "safety.strict", f"must be True or False, got {self.strict!r}")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How the ranks of a run share the model (bitlm.parallel.parallelize applies it)."""

    strategy: StrategyName = "ddp"  # with one rank, ddp and fsdp train as a single process
    n_microbatches: int = 4  # pipeline: micro-batches per step
    pipeline_schedule: PipelineSchedule = "gpipe"
    activation_checkpointing: bool = False  # recompute each block's activations in backward

    def __post_init__(self) -> None:
        check_fields(self, "parallel.")
        check(self.n_microbatches >= 1, "parallel.n_microbatches", f"must be >= 1, got {self.n_microbatches}")


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """Everything one local training run needs; the dotted keys of `--set` address its fields."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)  # the gate's defaults for generate --safe and serve
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        check_fields(self, "")
        # engine.fit refuses the same at start-up; scaling's context expansions later grow
        # max_positions and context_bytes together, so the start has to fit with or without scaling
        max_bytes = self.model.context_bytes
        check(self.train.context_bytes <= max_bytes, "train.context_bytes",
               f"must be <= {max_bytes}, the model's context in bytes (model.max_positions={self.model.max_positions}), "
               f"got {self.train.context_bytes}")
        # FSDP2 shards every matrix across ranks; Muon orthogonalises whole matrices (bitlm.parallel.FSDPStrategy)
        check(not (self.train.optimizer == "muon" and self.parallel.strategy == "fsdp"), "train.optimizer",
              "'muon' is not supported with parallel.strategy='fsdp' (Muon needs whole weight matrices); "
              "use 'adamw', or parallel.strategy 'ddp' or 'pipeline'")


# the dotted prefix that names a section's fields in errors (from_dict(ModelConfig, ...) -> model.d_model)
_SECTIONS: dict[type, str] = {ModelConfig: "model.", TrainConfig: "train.", DiffusionConfig: "diffusion.",
                              ScalingConfig: "scaling.", SafetyConfig: "safety.", ParallelConfig: "parallel."}


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain JSON-safe data."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: Any, prefix: Optional[str] = None) -> Any:
    """Rebuild a config dataclass (nested ones included) from `to_dict` output.

    Unknown keys fail, and so does a value of the wrong type, naming the dotted field
    (`model.d_model: expected int, got str '64'`). JSON has types, so they are taken at their word:
    an int field refuses 64.0 and true, a bool field refuses "false"; a float field takes an int
    and stores it as a float. `prefix` names the section in errors; by default the one `cls` is.
    """
    if prefix is None:
        prefix = _SECTIONS.get(cls, "")
    where = prefix.rstrip(".") or cls.__name__
    data = upgrade_document(data, prefix)  # keys renamed or moved since (bitlm.renames)
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object of fields, got {show(data)}")
    hints = field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, f"{prefix}{key}.")
            continue
        check_value(value, tp, prefix + key)
        kwargs[key] = float(value) if takes_float(tp) and isinstance(value, int) else value
    return cls(**kwargs)


def to_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted-key view of a (nested) config, as logged params and Tune search keys."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, key + "."))
        else:
            out[key] = value
    return out


# dotted-key overrides live in bitlm.overrides; re-exported here, where every caller looks for them
from .overrides import apply_overrides  # noqa: E402,F401  (imports this module's checks)
