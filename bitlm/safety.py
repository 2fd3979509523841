"""Safety gate: per-stream EMA floors on the C and S telemetry, gated inference and sampling with bounded retries."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import numpy as np
import torch

from .codec import as_bit_array, bits_to_bytes, bytes_to_bits
from .config import SafetyConfig  # SafetyConfig: the `safety` section of a run's config
from .fields import is_int
from .modes import eval_mode
from .sampling import generate
from .telemetry import complexity_and_symbiosis

logger = logging.getLogger(__name__)

Mode = Literal["causal", "diffusion"]
DiffusionSampler = Callable[[Any, str, int, int], str]

# Telemetry values are computed in float32 by the model; allow for their rounding at the [0, 1] ends.
_RANGE_SLACK = 1e-5
# Context-sized windows read per forward when measuring K: bounds memory on long inputs.
_K_BATCH_WINDOWS = 8


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """One decision of the gate.

    K, C and S are the smoothed values the decision used (K is reported, never gated); raw_* are
    this observation's. `reasons` lists every floor the smoothed values break, also during burn-in
    (`armed` False), where they are reported but do not block.
    """

    passed: bool
    K: Optional[float]
    C: float
    S: float
    raw_K: Optional[float]
    raw_C: float
    raw_S: float
    c_floor: float
    s_floor: float
    reasons: list[str]
    stream: str
    n_observed: int
    armed: bool
    attempts: list[dict[str, Any]] = field(default_factory=list)
    text: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON-safe values."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """One line of JSON with sorted keys."""
        # json escapes newlines inside strings, so the generated text cannot break the line
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)


class SafetyBlocked(RuntimeError):
    """Raised in strict mode when the gate blocks; `.verdict` holds the decision."""

    def __init__(self, verdict: Verdict):
        self.verdict = verdict
        broken = "; ".join(verdict.reasons) or "no floor reported"
        super().__init__(f"safety gate blocked stream {verdict.stream!r} "
                         f"after {verdict.n_observed} observations: {broken}")

    def __reduce__(self):  # pickled across processes (Ray) it is rebuilt from its verdict, not its message
        return (type(self), (self.verdict,))


@dataclass
class _StreamState:
    n_observed: int = 0
    C: float = 0.0
    S: float = 0.0
    K: Optional[float] = None


def _metric(value: Any, name: str, optional: bool = False) -> Optional[float]:
    """A telemetry value as a float in [0, 1]; NaN is refused because it would compare as passing."""
    if value is None and optional:
        return None
    if isinstance(value, torch.Tensor):
        value = value.item()
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not -_RANGE_SLACK <= x <= 1.0 + _RANGE_SLACK:
        raise ValueError(f"{name} must be a finite number in [0, 1], got {value!r}")
    return min(1.0, max(0.0, x))


class SafetyGate:
    """Keeps an EMA of C and S per stream and blocks when a floor is broken after burn-in."""

    def __init__(self, config: Optional[SafetyConfig] = None, **overrides: Any):
        base = config if config is not None else SafetyConfig()
        self.config = dataclasses.replace(base, **overrides) if overrides else base
        self._streams: dict[str, _StreamState] = {}
        # Serving code may share one gate between request threads; updates of a stream must not interleave.
        self._lock = threading.Lock()

    def observe(self, K: Any, C: Any, S: Any, stream: str = "default") -> Verdict:
        """Fold one observation into the stream's EMA and decide; K may be None (it is reported, not gated)."""
        raw_k = _metric(K, "K", optional=True)
        raw_c, raw_s = _metric(C, "C"), _metric(S, "S")
        cfg = self.config
        with self._lock:
            st = self._streams.setdefault(stream, _StreamState())
            if st.n_observed == 0:
                st.C, st.S = raw_c, raw_s
            else:
                st.C = cfg.decay * st.C + (1.0 - cfg.decay) * raw_c
                st.S = cfg.decay * st.S + (1.0 - cfg.decay) * raw_s
            if raw_k is not None:
                st.K = raw_k if st.K is None else cfg.decay * st.K + (1.0 - cfg.decay) * raw_k
            st.n_observed += 1
            ema_k, ema_c, ema_s, n = st.K, st.C, st.S, st.n_observed
        reasons = []
        if ema_c < cfg.c_floor:
            reasons.append(f"C {ema_c:.3f} < floor {cfg.c_floor:.3f}")
        if ema_s < cfg.s_floor:
            reasons.append(f"S {ema_s:.3f} < floor {cfg.s_floor:.3f}")
        armed = n > cfg.burn_in
        return Verdict(passed=not (armed and reasons), K=ema_k, C=ema_c, S=ema_s, raw_K=raw_k, raw_C=raw_c,
                       raw_S=raw_s, c_floor=cfg.c_floor, s_floor=cfg.s_floor, reasons=reasons, stream=stream,
                       n_observed=n, armed=armed)

    def reset(self, stream: Optional[str] = None) -> None:
        """Forget one stream's history, or every stream's when none is named."""
        with self._lock:
            if stream is None:
                self._streams.clear()
            else:
                self._streams.pop(stream, None)

    def state(self, stream: str = "default") -> Optional[dict[str, Any]]:
        """The stream's observation count and EMA values, or None if it has no history."""
        with self._lock:
            st = self._streams.get(stream)
            return None if st is None else dataclasses.asdict(st)

    def clone(self, stream: Optional[str] = None) -> "SafetyGate":
        """An independent gate with the same config and a copy of one stream's state (all if none is named)."""
        other = SafetyGate(self.config)
        with self._lock:
            names = self._streams if stream is None else [n for n in (stream,) if n in self._streams]
            other._streams = {name: dataclasses.replace(self._streams[name]) for name in names}
        return other


def _bits_1d(bits: Any) -> np.ndarray:
    """Accept a (T,) or (1, T) tensor/array of 0/1 and return it as a flat uint8 array."""
    shape = tuple(bits.shape) if isinstance(bits, torch.Tensor) else np.shape(bits)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[0] == 1)):
        raise ValueError(f"bits must have shape (T,) or (1, T), got {shape}")
    arr = as_bit_array(bits)
    if arr.size == 0:
        raise ValueError("bits must hold at least one bit")
    return arr


@torch.no_grad()
def _negentropy(model, ids: torch.Tensor) -> float:
    """Mean K of the model's predictions over (T,) ids, read in windows of at most the model's context."""
    cfg = model.config
    window = cfg.max_input_ids // cfg.ids_per_byte * cfg.ids_per_byte  # whole bytes keep phases aligned
    device = model.reference_marginals.device
    n_full = ids.numel() // window
    total, count = 0.0, 0
    with eval_mode(model):
        full = ids[:n_full * window].view(n_full, window)
        for i in range(0, n_full, _K_BATCH_WINDOWS):
            _, tel = model(full[i:i + _K_BATCH_WINDOWS].to(device), return_telemetry=True)
            total += float(tel["negentropy"].double().sum()) * window
            count += tel["negentropy"].numel() * window
        tail = ids[n_full * window:]
        if tail.numel():
            _, tel = model(tail[None].to(device), return_telemetry=True)
            total += float(tel["negentropy"][0]) * tail.numel()
            count += tail.numel()
    return total / count


def measure(model, bits: Any, *, window_bytes: int = 512) -> dict[str, float]:
    """K, C and S of a bit sequence (the model's parity convention) under `model`.

    K is the model's negentropy averaged over non-overlapping context-sized windows; C and S are
    means over window_bytes-sized windows of the bits, with model.reference_marginals as S's
    reference. For the byte baseline the bits are packed to bytes (parity bits ignored) for K.
    """
    cfg = model.config
    arr = _bits_1d(bits)
    reference = model.reference_marginals.detach().cpu().numpy()
    if np.all(reference == 0.5):
        warnings.warn("model.reference_marginals is still the uniform default: S is measured against 0.5 per bit; "
                      "call model.set_reference_marginals(corpus.phase_marginals(parity)) first",
                      RuntimeWarning, stacklevel=2)
    if cfg.representation == "bit":
        ids = torch.from_numpy(arr.astype(np.int64))
    else:
        if arr.size % cfg.bits_per_byte:
            raise ValueError(f"bits for the byte baseline must hold whole bytes: {arr.size} bits is not a multiple "
                             f"of bits_per_byte={cfg.bits_per_byte}")
        data = bits_to_bytes(arr, parity=cfg.parity, repair=True)
        ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    c, s = complexity_and_symbiosis(arr, reference, cfg.bits_per_byte, window_bytes)
    return {"K": _negentropy(model, ids), "C": c, "S": s}


def _resolve_gate(gate: Optional[SafetyGate], c_floor: Optional[float], s_floor: Optional[float],
                  **policy: Any) -> tuple[SafetyGate, SafetyConfig]:
    """The gate to record in and the config of this call (its retry policy may differ from the gate's)."""
    policy = {k: v for k, v in policy.items() if v is not None}
    if gate is None:
        floors = {k: v for k, v in (("c_floor", c_floor), ("s_floor", s_floor)) if v is not None}
        cfg = SafetyConfig(**floors, **policy)
        return SafetyGate(cfg), cfg
    # The gate's EMA only means something against its own floors, so a call may not move them.
    for name, value in (("c_floor", c_floor), ("s_floor", s_floor)):
        if value is not None and value != getattr(gate.config, name):
            raise ValueError(f"{name}={value} conflicts with the gate's {name}={getattr(gate.config, name)}; "
                             "set floors in the gate's SafetyConfig")
    return gate, dataclasses.replace(gate.config, **policy)


def hil_safe_inference(model, bits: Any, c_floor: Optional[float] = None, s_floor: Optional[float] = None,
                       strict: Optional[bool] = None, gate: Optional[SafetyGate] = None,
                       stream: str = "default") -> tuple[torch.Tensor, Verdict]:
    """Measure a (T,) or (1, T) bit sequence, ask the gate, and return (bits, verdict).

    Without a gate a fresh one is used (floors default to 0.3 and 0.5, no smoothing, no burn-in);
    with one, its config sets the floors and the window. strict (default: the config's) raises
    SafetyBlocked instead of returning a failed verdict.
    """
    real, cfg = _resolve_gate(gate, c_floor, s_floor, strict=strict)
    out = bits if isinstance(bits, torch.Tensor) else torch.as_tensor(np.asarray(bits))
    metrics = measure(model, bits, window_bytes=cfg.window_bytes)
    verdict = real.observe(metrics["K"], metrics["C"], metrics["S"], stream=stream)
    if not verdict.passed:
        logger.warning("safety gate blocked stream %r: %s", stream, "; ".join(verdict.reasons))
        if cfg.strict:
            raise SafetyBlocked(verdict)
    return out, verdict


def safe_sample_with_retry(model, prompt: str, max_new_bytes: int = 128, *, max_retries: Optional[int] = None,
                           backoff_s: Optional[float] = None, c_floor: Optional[float] = None,
                           s_floor: Optional[float] = None, strict: Optional[bool] = None, seed: int = 0,
                           temperature: float = 0.8, diffusion_sampler: Optional[DiffusionSampler] = None,
                           gate: Optional[SafetyGate] = None, stream: str = "default") -> tuple[str, Verdict]:
    """Sample, gate the prompt + continuation, and retry a blocked sample with a new seed; returns (text, verdict).

    Attempt k (0..max_retries) uses seed + k and sleeps backoff_s * 2 ** (k - 1) first; the last
    retry runs `diffusion_sampler(model, prompt, max_new_bytes, seed)` (it returns the full text,
    prompt included) when one is given. Each attempt is judged on a copy of the gate, so rejected
    samples never enter the stream's EMA; only the returned sample is recorded in `gate`.
    Unset options come from the gate's config, or SafetyConfig's defaults (2 retries, no backoff,
    floors 0.3 and 0.5, not strict). When every attempt is blocked, strict raises SafetyBlocked;
    otherwise the last text is returned with verdict.passed False.
    """
    if not is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    real, cfg = _resolve_gate(gate, c_floor, s_floor, max_retries=max_retries, backoff_s=backoff_s, strict=strict)
    parity = model.config.parity
    prompt_bytes = prompt.encode("utf-8")
    attempts: list[dict[str, Any]] = []
    text, metrics = "", {}
    for k in range(1 + cfg.max_retries):
        if k and cfg.backoff_s:
            time.sleep(cfg.backoff_s * 2 ** (k - 1))
        last_retry = diffusion_sampler is not None and k > 0 and k == cfg.max_retries
        mode: Mode = "diffusion" if (last_retry or not model.config.causal) else "causal"
        attempt_seed = seed + k
        if mode == "causal":
            gen = generate(model, prompt, max_new_bytes, temperature=temperature, seed=attempt_seed)
            text, data = gen.text, prompt_bytes + gen.new_bytes
        else:
            # a non-causal model can only be sampled by diffusion: every attempt uses it
            sampler = diffusion_sampler or _default_diffusion_sampler
            out = sampler(model, prompt, max_new_bytes, attempt_seed)
            if isinstance(out, str):
                text, data = out, out.encode("utf-8")
            elif hasattr(out, "new_bytes"):  # a Generation: gate the exact bytes, not their decoded text
                text, data = out.text, prompt_bytes + out.new_bytes
            else:
                raise ValueError(f"diffusion_sampler must return str text or a Generation, got {type(out).__name__}")
        metrics = measure(model, bytes_to_bits(data, parity=parity), window_bytes=cfg.window_bytes)
        trial = real.clone(stream).observe(metrics["K"], metrics["C"], metrics["S"], stream=stream)
        attempts.append({"attempt": k, "mode": mode, "seed": attempt_seed, "passed": trial.passed,
                         "K": metrics["K"], "C": metrics["C"], "S": metrics["S"], "reasons": trial.reasons})
        if trial.passed:
            break
        logger.warning("safety gate blocked attempt %d/%d (%s, seed %d) on stream %r: %s", k + 1,
                       1 + cfg.max_retries, mode, attempt_seed, stream, "; ".join(trial.reasons))
    # The real gate decides again on the kept sample; it agrees with the trial unless another
    # caller updated the same stream in between, and then the real gate's answer stands.
    final = real.observe(metrics["K"], metrics["C"], metrics["S"], stream=stream)
    verdict = dataclasses.replace(final, attempts=attempts, text=text)
    if not verdict.passed and cfg.strict:
        raise SafetyBlocked(verdict)
    return text, verdict


def _default_diffusion_sampler(model, prompt: str, max_new_bytes: int, seed: int):
    from .diffusion import diffusion_sample  # diffusion imports sampling; keep safety importable on its own

    return diffusion_sample(model, prompt, max_new_bytes, seed=seed)
