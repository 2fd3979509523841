"""Frozen, JSON-round-trippable configs with named presets and dotted-key overrides."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

Arch = Literal["flat", "patched"]
Representation = Literal["bit", "byte"]
Schedule = Literal["cosine", "onecycle", "constant"]
Precision = Literal["auto", "fp32", "bf16"]
NoiseSchedule = Literal["linear", "cosine", "exp", "loglinear"]


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {msg}")


def _check_choice(value: Any, name: str, tp: Any) -> None:
    allowed = typing.get_args(tp)
    _check(value in allowed, name, f"must be one of {list(allowed)}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape and options of a BitTransformerLM."""

    arch: Arch = "flat"
    representation: Representation = "bit"
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4
    d_ff: int = 512
    max_seq_len: int = 2304  # transformer positions: bits for the flat bit model, bytes otherwise
    dropout: float = 0.0
    parity: bool = True
    causal: bool = True
    reversible: bool = False
    checkpoint_activations: bool = False
    chunk_size: Optional[int] = None  # block-local attention window, in positions
    full_attn_logging: bool = False  # return (B, H, T, T) attention maps with telemetry
    act: bool = False  # adaptive computation time halting over layers
    act_threshold: float = 0.99
    # arch="patched": the local decoder that predicts each byte's bits from the byte-rate global state
    local_d_ff: int = 128  # width of the per-byte features z that every bit's tree node reads
    local_layers: int = 0  # residual MLPs computing z from the global state (run once per byte)
    n_streams: int = 1  # 2 for compression-aware training: a learned marker for rows of compressed bits

    def __post_init__(self) -> None:
        _check_choice(self.arch, "model.arch", Arch)
        _check_choice(self.representation, "model.representation", Representation)
        for name in ("d_model", "n_heads", "n_layers", "d_ff", "max_seq_len", "local_d_ff"):
            _check(getattr(self, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(self.d_model % self.n_heads == 0, "model.d_model",
               f"must be divisible by model.n_heads={self.n_heads}, got {self.d_model}")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(self.chunk_size is None or self.chunk_size >= 1, "model.chunk_size",
               f"must be None or >= 1, got {self.chunk_size}")
        _check(0.0 < self.act_threshold <= 1.0, "model.act_threshold",
               f"must be in (0, 1], got {self.act_threshold}")
        _check(self.local_layers >= 0, "model.local_layers", f"must be >= 0, got {self.local_layers}")
        _check(self.n_streams >= 1, "model.n_streams", f"must be >= 1, got {self.n_streams}")
        _check(self.arch == "flat" or self.representation == "bit", "model.arch",
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
        """Longest id sequence one forward accepts (max_seq_len positions, in ids)."""
        return self.max_seq_len * self.ids_per_byte // self.positions_per_byte

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_name(cls, name: str, kind: Optional[str] = None, **overrides: Any) -> "ModelConfig":
        """A named preset (`tiny`, `small`, `base`), optionally of a kind (`patched`, `flat`, `byte`).

        A preset fixes the shape and a context in bytes; max_seq_len follows from it for the chosen
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
        explicit_len = "max_seq_len" in overrides
        cfg = cls(**(shape | overrides))
        if explicit_len:
            return cfg
        return dataclasses.replace(cfg, max_seq_len=context_bytes * cfg.positions_per_byte)


# The three model kinds a run chooses between: the byte-patched bit model, the flat bit model of
# the seeds (one position per bit) and the byte baseline (same backbone, 256-way in and out).
MODEL_KINDS: dict[str, dict[str, str]] = {
    "patched": {"arch": "patched", "representation": "bit"},
    "flat": {"arch": "flat", "representation": "bit"},
    "byte": {"arch": "flat", "representation": "byte"},
}

# Shapes plus the context (in bytes) each preset is sized for.
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 64, "n_heads": 4, "n_layers": 2, "d_ff": 256, "context_bytes": 128},
    "small": {"d_model": 128, "n_heads": 4, "n_layers": 4, "d_ff": 512, "context_bytes": 256},
    "base": {"d_model": 512, "n_heads": 8, "n_layers": 8, "d_ff": 2048, "context_bytes": 512},
}


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
    schedule: Schedule = "cosine"
    grad_clip: float = 1.0
    precision: Precision = "auto"
    compile: bool = False
    log_every: int = 25
    eval_every: int = 200
    eval_batches: int = 20
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
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

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum_steps", "max_steps", "log_every", "eval_every",
                     "eval_batches", "keep_checkpoints"):
            _check(getattr(self, name) >= 1, f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(self.context_bytes >= 2, "train.context_bytes", f"must be >= 2, got {self.context_bytes}")
        _check(self.max_seconds is None or self.max_seconds > 0, "train.max_seconds",
               f"must be None or > 0, got {self.max_seconds}")
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1/beta2", "must be in [0, 1)")
        _check(self.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check_choice(self.schedule, "train.schedule", Schedule)
        _check(self.grad_clip >= 0, "train.grad_clip", f"must be >= 0 (0 disables), got {self.grad_clip}")
        _check_choice(self.precision, "train.precision", Precision)
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        for name in ("lambda_k", "lambda_c", "lambda_s"):
            _check(getattr(self, name) >= 0, f"train.{name}", f"must be >= 0, got {getattr(self, name)}")
        _check(self.drift_window >= 1, "train.drift_window", f"must be >= 1, got {self.drift_window}")
        _check(self.drift_threshold >= 0, "train.drift_threshold", f"must be >= 0, got {self.drift_threshold}")
        _check(0.0 <= self.compress_prob <= 1.0, "train.compress_prob", f"must be in [0, 1], got {self.compress_prob}")
        for name in ("compress_warmup_steps", "compress_ramp_steps"):
            _check(getattr(self, name) >= 0, f"train.{name}", f"must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True, kw_only=True)
class DiffusionConfig:
    """Masked-diffusion training and sampling (used when model.causal is False)."""

    noise_schedule: NoiseSchedule = "cosine"
    steps: int = 16  # reverse-diffusion steps when sampling
    curriculum: bool = False  # draw heavy noise early in training, uniform by the end

    def __post_init__(self) -> None:
        _check_choice(self.noise_schedule, "diffusion.noise_schedule", NoiseSchedule)
        _check(self.steps >= 1, "diffusion.steps", f"must be >= 1, got {self.steps}")


ExpansionKind = Literal["depth", "width", "context"]


@dataclass(frozen=True, kw_only=True)
class ScalingConfig:
    """Progressive scaling: grow the model when validation loss plateaus (bitlm.scaling)."""

    enabled: bool = False
    window: int = 3  # evaluations per window of the plateau detector
    improve_thresh: float = 0.01  # plateau: relative val-loss improvement between windows below this
    order: str = "depth,width,context"  # expansions cycle through these kinds, comma-separated
    add_layers: int = 1  # layers a depth expansion appends
    max_expansions: int = 6
    max_parameters: int = 100_000_000  # no expansion may grow the model past this
    max_context_bytes: int = 4096  # no context expansion past this
    lr_decay: float = 2 ** 0.5  # the base learning rate is divided by this at every expansion
    rewarm_steps: int = 100  # linear learning-rate warm-up after each expansion

    def __post_init__(self) -> None:
        _check(self.window >= 1, "scaling.window", f"must be >= 1, got {self.window}")
        _check(self.improve_thresh >= 0, "scaling.improve_thresh", f"must be >= 0, got {self.improve_thresh}")
        kinds = self.kinds
        _check(len(kinds) >= 1, "scaling.order", "must name at least one of depth, width, context")
        for kind in kinds:
            _check_choice(kind, "scaling.order", ExpansionKind)
        _check(self.add_layers >= 1, "scaling.add_layers", f"must be >= 1, got {self.add_layers}")
        _check(self.max_expansions >= 0, "scaling.max_expansions", f"must be >= 0, got {self.max_expansions}")
        _check(self.max_parameters >= 1, "scaling.max_parameters", f"must be >= 1, got {self.max_parameters}")
        _check(self.max_context_bytes >= 2, "scaling.max_context_bytes",
               f"must be >= 2, got {self.max_context_bytes}")
        _check(self.lr_decay >= 1.0, "scaling.lr_decay", f"must be >= 1, got {self.lr_decay}")
        _check(self.rewarm_steps >= 0, "scaling.rewarm_steps", f"must be >= 0, got {self.rewarm_steps}")

    @property
    def kinds(self) -> tuple[str, ...]:
        """The expansion cycle, e.g. ("depth", "width", "context")."""
        return tuple(k.strip() for k in self.order.split(",") if k.strip())


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """Everything one local training run needs; the dotted keys of `--set` address its fields."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain JSON-safe data."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a config dataclass (nested ones included) from `to_dict` output; unknown keys fail."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        kwargs[key] = from_dict(tp, value) if dataclasses.is_dataclass(tp) else value
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


def _coerce(value: str, tp: Any, key: str) -> Any:
    """Parse a command-line string into the field's declared type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        return value
    if tp is bool:
        lowered = value.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{key}: expected a boolean (true/false), got {value!r}")
    if tp in (int, float):
        try:
            return tp(float(value)) if tp is int and float(value).is_integer() else tp(value)
        except ValueError:
            raise ValueError(f"{key}: expected {tp.__name__}, got {value!r}") from None
    return value


def apply_overrides(cfg: Any, assignments: list[str] | tuple[str, ...]) -> Any:
    """Return `cfg` with `key.sub=value` assignments applied (validated by the dataclasses)."""
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value, e.g. model.n_layers=8")
        key, value = item.split("=", 1)
        cfg = _set_path(cfg, key.strip().split("."), value.strip(), key.strip())
    return cfg


def _set_path(cfg: Any, path: list[str], value: str, full_key: str) -> Any:
    names = {f.name for f in dataclasses.fields(cfg)}
    if path[0] not in names:
        raise ValueError(f"override {full_key!r}: {type(cfg).__name__} has no field {path[0]!r}; "
                         f"known: {sorted(names)}")
    current = getattr(cfg, path[0])
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"override {full_key!r}: {path[0]!r} is not a config section")
        return dataclasses.replace(cfg, **{path[0]: _set_path(current, path[1:], value, full_key)})
    if dataclasses.is_dataclass(current):
        raise ValueError(f"override {full_key!r}: {path[0]!r} is a section; set one of its fields")
    tp = typing.get_type_hints(type(cfg))[path[0]]
    return dataclasses.replace(cfg, **{path[0]: _coerce(value, tp, full_key)})
