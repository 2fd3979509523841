"""K (negentropy), C (LZ76 complexity) and S (symbiosis) telemetry of bit sequences, and metric drift detection."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from bitlm.codec import as_bit_array

_ENTROPY_EPS = 1e-7
_PROXY_EPS = 1e-6

ArrayLike = np.ndarray | torch.Tensor


def _to_numpy(x: ArrayLike | Sequence) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _bits_2d(bits: ArrayLike) -> np.ndarray:
    """Validate 0/1 values and return a (B, T) uint8 array (a 1-D input becomes one row)."""
    arr = _to_numpy(bits)
    if arr.ndim not in (1, 2):
        raise ValueError(f"bits must have shape (T,) or (B, T), got {arr.shape}")
    shape = (1, arr.shape[0]) if arr.ndim == 1 else arr.shape
    return as_bit_array(arr).reshape(shape)


def negentropy(p_one: torch.Tensor) -> torch.Tensor:
    """K = 1 - mean_t H2(p_t) in bits over the last dim; 1 is fully predictable, 0 is coin flips."""
    # In half precision 1 - 1e-7 rounds to 1 and the entropy turns into nan, so upcast first.
    x = p_one.float() if p_one.dtype in (torch.float16, torch.bfloat16) else p_one
    p = x.clamp(_ENTROPY_EPS, 1.0 - _ENTROPY_EPS)
    h = -(p * torch.log2(p) + (1.0 - p) * torch.log2(1.0 - p))
    return (1.0 - h.mean(dim=-1)).to(p_one.dtype)


def lz76_phrase_count(bits: ArrayLike | Sequence[int]) -> int:
    """Number of phrases c(n) in the Lempel-Ziv 1976 parsing of a 1-D bit sequence (Kaspar & Schuster 1987).

    Each new phrase is the longest prefix of the remaining sequence that already occurs starting
    somewhere earlier (the occurrence may overlap the prefix itself) plus one fresh symbol; a last
    phrase that runs into the end of the sequence still counts. "0001101001000101" parses as
    0.001.10.100.1000.101, c = 6.
    """
    arr = _to_numpy(bits)
    if arr.ndim != 1:
        raise ValueError(f"lz76_phrase_count takes a 1-D sequence, got shape {arr.shape}")
    s = as_bit_array(arr).tobytes()
    n = len(s)
    if n == 0:
        return 0
    count, start = 1, 1
    while start < n:
        # Grow the copied prefix s[start:start+k]; a source occurrence must begin before `start`,
        # so it lies inside s[:start + k - 1]. A longer prefix's first occurrence cannot come
        # earlier than a shorter one's, so each search resumes from the last hit.
        k, hit = 0, 0
        while start + k < n:
            if s[hit + k] == s[start + k]:
                k += 1
                continue
            hit = s.find(s[start : start + k + 1], hit, start + k)
            if hit < 0:
                break
            k += 1
        count += 1
        if start + k >= n:
            break
        start += k + 1
    return count


def lz_complexity(bits: ArrayLike | Sequence[int]) -> float:
    """C = c(n) * log2(n) / n clipped to [0, 1]; 1 for incompressible bits, near 0 for repetition.

    Sequences with n <= 1 have no structure to measure and get 0.0 (the formula's value at n == 1).
    """
    arr = _to_numpy(bits)
    if arr.ndim != 1:
        raise ValueError(f"lz_complexity takes a 1-D sequence, got shape {arr.shape}")
    n = arr.size
    if n <= 1:
        as_bit_array(arr)
        return 0.0
    c = lz76_phrase_count(arr)
    return float(min(1.0, c * math.log2(n) / n))


def lz_complexity_batch(bits: ArrayLike) -> np.ndarray:
    """Per-row ``lz_complexity`` of a (B, T) bit array, as a float64 array of shape (B,)."""
    arr = _to_numpy(bits)
    if arr.ndim != 2:
        raise ValueError(f"lz_complexity_batch takes a (B, T) array, got shape {arr.shape}")
    rows = _bits_2d(arr)
    return np.array([lz_complexity(row) for row in rows], dtype=np.float64)


def lz_complexity_proxy(p_one: torch.Tensor, max_lag: int = 72, temperature: float = 0.05) -> torch.Tensor:
    """Differentiable stand-in for C: a soft minimum over lags of the expected self-mismatch rate.

    For each lag l in 1..min(max_lag, T-1), with p_t the predicted P(bit=1),
    m_l = 2 * mean_t [p_t (1 - p_{t-l}) + p_{t-l} (1 - p_t)], the expected Hamming mismatch of the
    sequence against itself shifted by l for independent Bernoullis, scaled so that p = 0.5
    everywhere gives 1 and a confident sequence of period l gives 0. The proxy is
    -temperature * logsumexp(-m / temperature) over the lags, clipped to [0, 1]; shape (B,).
    The soft minimum sits below the smallest m_l by up to temperature * ln(#lags) (about 0.21 for
    72 lags at 0.05), so uniform uncertainty reads about 0.79 and a repetition loop reads 0.
    Sequences too short for any lag (T < 2) get 1.0: no repetition can be seen in them.
    """
    if p_one.dim() != 2:
        raise ValueError(f"p_one must have shape (B, T), got {tuple(p_one.shape)}")
    if max_lag < 1:
        raise ValueError(f"max_lag must be >= 1, got {max_lag}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    length = p_one.shape[1]
    n_lags = min(max_lag, length - 1)
    if n_lags < 1:
        return p_one.new_ones(p_one.shape[0])
    # FFT spectra have no half-precision path for arbitrary lengths, so work in at least float32.
    x = p_one if p_one.dtype in (torch.float32, torch.float64) else p_one.float()
    # sum_t p_t (1 - p_{t-l}) + p_{t-l} (1 - p_t) = sum p_t + sum p_{t-l} - 2 sum p_t p_{t-l}: the
    # first two are prefix-sum differences and the cross term is the autocorrelation at lag l,
    # so all lags cost one FFT instead of one pass over the sequence each.
    spectrum = torch.fft.rfft(x, n=2 * length)
    autocorr = torch.fft.irfft(spectrum * spectrum.conj(), n=2 * length)[:, 1 : n_lags + 1]
    prefix = x.cumsum(dim=1)
    lags = torch.arange(1, n_lags + 1, device=x.device)
    later = prefix[:, -1:] - prefix[:, lags - 1]
    earlier = prefix[:, length - 1 - lags]
    mismatch = 2.0 * (later + earlier - 2.0 * autocorr) / (length - lags).to(x.dtype)
    soft_min = -temperature * torch.logsumexp(-mismatch / temperature, dim=1)
    return soft_min.clamp(0.0, 1.0).to(p_one.dtype)


def bernoulli_kl(q: ArrayLike, r: ArrayLike) -> ArrayLike:
    """Elementwise KL(Bern(q) || Bern(r)) in nats, for numpy arrays or torch tensors (q, r in (0, 1))."""
    log = torch.log if isinstance(q, torch.Tensor) else np.log
    return q * (log(q) - log(r)) + (1 - q) * (log(1 - q) - log(1 - r))


def _phase_counts(rows: np.ndarray, bits_per_byte: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row ones and per-phase position counts, shapes (B, bpb) and (bpb,)."""
    n_rows, length = rows.shape
    n_groups = -(-length // bits_per_byte)
    if length % bits_per_byte:
        padded = np.zeros((n_rows, n_groups * bits_per_byte), dtype=np.uint8)
        padded[:, :length] = rows
        rows = padded
    ones = rows.reshape(n_rows, n_groups, bits_per_byte).sum(axis=1, dtype=np.int64)
    counts = np.bincount(np.arange(length) % bits_per_byte, minlength=bits_per_byte)
    return ones, counts


def _check_bpb(bits_per_byte: int) -> None:
    if bits_per_byte < 1:
        raise ValueError(f"bits_per_byte must be >= 1, got {bits_per_byte}")


def phase_marginals(bits: ArrayLike, bits_per_byte: int) -> np.ndarray:
    """Laplace-smoothed P(bit=1) at each phase t mod bits_per_byte, pooled over all rows; float64 (bpb,)."""
    _check_bpb(bits_per_byte)
    ones, counts = _phase_counts(_bits_2d(bits), bits_per_byte)
    n_rows = ones.shape[0]
    return (ones.sum(axis=0) + 1.0) / (counts * n_rows + 2.0)


def _check_reference(reference: ArrayLike, bits_per_byte: int) -> np.ndarray:
    ref = _to_numpy(reference).astype(np.float64).reshape(-1)
    if ref.size != bits_per_byte:
        raise ValueError(f"reference has {ref.size} entries, expected bits_per_byte={bits_per_byte}")
    outside = np.flatnonzero(~((ref > 0) & (ref < 1)))
    if outside.size:
        i = int(outside[0])
        raise ValueError(f"reference marginals must lie in (0, 1): phase {i} has value {ref[i]}")
    return ref


def symbiosis(bits: ArrayLike, reference: ArrayLike, bits_per_byte: int) -> np.ndarray | float:
    """S = exp(-sum_j KL(q_j || r_j)) per sequence; q_j = (ones_j + 1) / (count_j + 2) at phase j.

    Returns shape (B,) for (B, T) bits and a float for a 1-D sequence.
    """
    _check_bpb(bits_per_byte)
    ref = _check_reference(reference, bits_per_byte)
    arr = _to_numpy(bits)
    ones, counts = _phase_counts(_bits_2d(arr), bits_per_byte)
    q = (ones + 1.0) / (counts + 2.0)
    s = np.exp(-bernoulli_kl(q, ref[None, :]).sum(axis=1))
    return float(s[0]) if arr.ndim == 1 else s


def symbiosis_proxy(p_one: torch.Tensor, reference: torch.Tensor, bits_per_byte: int) -> torch.Tensor:
    """Differentiable S: q_j is the mean predicted P(bit=1) at phase j, clamped to [1e-6, 1 - 1e-6]; shape (B,).

    Phases with no position in the sequence (T < bits_per_byte) contribute nothing.
    """
    if p_one.dim() != 2:
        raise ValueError(f"p_one must have shape (B, T), got {tuple(p_one.shape)}")
    _check_bpb(bits_per_byte)
    # The 1e-6 clamp is below half-precision resolution near 1, so upcast before taking logs.
    x = p_one.float() if p_one.dtype in (torch.float16, torch.bfloat16) else p_one
    ref = torch.as_tensor(reference, dtype=x.dtype, device=x.device).reshape(1, -1)
    # Checking the values needs them on the host; on an accelerator that would stall every step.
    if ref.device.type == "cpu":
        _check_reference(ref, bits_per_byte)
    elif ref.shape[1] != bits_per_byte:
        raise ValueError(f"reference has {ref.shape[1]} entries, expected bits_per_byte={bits_per_byte}")
    length = x.shape[1]
    phases = torch.arange(bits_per_byte, device=x.device)
    onehot = (torch.arange(length, device=x.device)[:, None] % bits_per_byte == phases).to(x.dtype)
    counts = onehot.sum(dim=0)
    q = (x @ onehot) / counts.clamp(min=1.0)
    q = q.clamp(_PROXY_EPS, 1.0 - _PROXY_EPS)
    kl = bernoulli_kl(q, ref) * (counts > 0).to(x.dtype)
    return torch.exp(-kl.sum(dim=1)).to(p_one.dtype)


def telemetry_summary(
    bits: torch.Tensor, p_one: torch.Tensor, reference: ArrayLike, bits_per_byte: int
) -> dict[str, torch.Tensor]:
    """K from p_one, C and S from the observed bits; each a detached float32 (B,) tensor on p_one's device."""
    if tuple(bits.shape) != tuple(p_one.shape) or p_one.dim() != 2:
        raise ValueError(
            f"bits and p_one must share one (B, T) shape, got {tuple(bits.shape)} and {tuple(p_one.shape)}"
        )
    device = p_one.device
    k = negentropy(p_one.detach().float())
    c = lz_complexity_batch(bits)
    s = symbiosis(bits, reference, bits_per_byte)
    return {
        "negentropy": k.to(torch.float32),
        "lz_complexity": torch.as_tensor(c, dtype=torch.float32, device=device),
        "symbiosis": torch.as_tensor(s, dtype=torch.float32, device=device),
    }


def prediction_summary(p_one: torch.Tensor, predicted_bits: torch.Tensor, reference: ArrayLike, bits_per_byte: int,
                       weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """K, C and S of what a model predicts, not of the bits it read; detached float32 (B,) tensors.

    p_one (B, T) is the predicted P(bit=1) and predicted_bits (B, T) the sequence it predicts, column 0
    at byte phase 0; weight (B, T) of 0/1 picks the predicted positions (default: all). K is the
    negentropy of p_one, C the LZ complexity of predicted_bits, and S = exp(-sum_j KL(q_j || r_j))
    with q_j = (expected ones at phase j + 1) / (picked positions at phase j + 2): symbiosis's
    smoothed frequency with the predicted P(bit=1) in place of the bits, so a model that predicts
    the bits exactly reads the C and S of the bits themselves. A phase without a picked position
    contributes nothing to S.
    """
    if tuple(predicted_bits.shape) != tuple(p_one.shape) or p_one.dim() != 2:
        raise ValueError(f"p_one and predicted_bits must share one (B, T) shape, "
                         f"got {tuple(p_one.shape)} and {tuple(predicted_bits.shape)}")
    _check_bpb(bits_per_byte)
    p = p_one.detach().double().clamp(_PROXY_EPS, 1.0 - _PROXY_EPS)
    w = torch.ones_like(p) if weight is None else weight.detach().to(p)
    ref = torch.as_tensor(_check_reference(reference, bits_per_byte), dtype=p.dtype, device=p.device)
    h = -(p * torch.log2(p) + (1.0 - p) * torch.log2(1.0 - p))
    k = 1.0 - (h * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)
    onehot = (torch.arange(p.shape[1], device=p.device)[:, None] % bits_per_byte
              == torch.arange(bits_per_byte, device=p.device)).to(p.dtype)  # (T, bpb)
    counts = w @ onehot  # (B, bpb)
    q = ((p * w) @ onehot + 1.0) / (counts + 2.0)
    s = torch.exp(-(bernoulli_kl(q, ref[None, :]) * (counts > 0).to(p.dtype)).sum(dim=1))
    c = lz_complexity_batch(predicted_bits)
    return {"negentropy": k.float(), "lz_complexity": torch.as_tensor(c, dtype=torch.float32, device=p.device),
            "symbiosis": s.float()}


def detect_metric_drift(
    history: Sequence[Mapping[str, float]], window: int = 100, threshold: float = 0.2
) -> dict[str, float]:
    """Metrics whose mean over the last ``window`` values moved by more than ``threshold`` from the window before.

    Returns {metric: last-window mean minus previous-window mean}; metrics with fewer than
    2 * window values are not judged. A step that lacks a metric simply adds no value for it.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold!r}")
    series: dict[str, list[float]] = {}
    for step, record in enumerate(history):
        if not isinstance(record, Mapping):
            raise ValueError(f"history[{step}] must be a mapping of metric name to value, got {type(record).__name__}")
        for name, value in record.items():
            series.setdefault(name, []).append(float(value))
    drifted: dict[str, float] = {}
    for name, values in series.items():
        if len(values) < 2 * window:
            continue
        tail = np.asarray(values[-2 * window :], dtype=np.float64)
        delta = float(tail[window:].mean() - tail[:window].mean())
        if abs(delta) > threshold:
            drifted[name] = delta
    return drifted


def _window_starts(length: int, window: int, unit: int) -> list[int]:
    """Starts of consecutive windows covering `length`, the last moved back (to a `unit` boundary) to end at the end."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, window))
    if starts[-1] + window < length:
        # A short tail window would be judged on a different scale (C depends on the length), so the
        # last window overlaps its neighbour instead; byte-aligned so that S sees the right phases.
        starts.append((length - window) // unit * unit)
    return starts


def complexity_and_symbiosis(bits: ArrayLike, reference: ArrayLike, bits_per_byte: int,
                             window_bytes: int = 512) -> tuple[float, float]:
    """Mean C and S over window_bytes-sized windows of a 1-D bit sequence (measured whole when shorter)."""
    arr = as_bit_array(bits)
    if arr.size == 0:
        raise ValueError("bits must hold at least one bit")
    if window_bytes < 1:
        raise ValueError(f"window_bytes must be >= 1, got {window_bytes}")
    window = window_bytes * bits_per_byte
    starts = _window_starts(arr.size, window, bits_per_byte)
    if len(starts) == 1:
        rows = [arr]
    else:
        rows = [arr[s:s + window] for s in starts[:-1]] + [arr[starts[-1]:]]
    if len({r.size for r in rows}) == 1:
        stacked = np.stack(rows)
        c = lz_complexity_batch(stacked)
        s = symbiosis(stacked, reference, bits_per_byte)
    else:  # only when the bits end in a partial byte and the last window is a few bits longer
        c = np.concatenate([lz_complexity_batch(r[None]) for r in rows])
        s = np.array([symbiosis(r, reference, bits_per_byte) for r in rows])
    return float(np.mean(c)), float(np.mean(s))


def byte_negentropy(probs: torch.Tensor) -> torch.Tensor:
    """K of a byte model: 1 - mean entropy of its 256-way predictions (..., T, 256) / 8 bits; shape (...)."""
    probs = probs.float()
    entropy_bits = -(probs * probs.clamp_min(1e-12).log2()).sum(-1)
    return 1.0 - entropy_bits.mean(-1) / 8.0
