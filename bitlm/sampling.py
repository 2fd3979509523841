"""Causal generation with the KV cache (temperature, top-k, top-p, seed) and long-input inference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from .codec import bits_to_bytes, bytes_to_bits, enforce_parity
from .modes import eval_mode


@dataclass
class Generation:
    text: str  # prompt + continuation, UTF-8 decoded with replacement characters
    new_bytes: bytes  # the continuation only
    n_parity_corrections: int  # parity bits the model got wrong and that were fixed after sampling


def filter_logits(logits: torch.Tensor, *, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) sets to -inf; (..., V) in, same shape out."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be None or >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p}")


def _pick(logits: torch.Tensor, temperature: float, top_k, top_p, generators: list[torch.Generator]) -> torch.Tensor:
    """Sample one id per row from (B, V) logits: from one shared generator, or one generator per row."""
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits.float() / temperature
    if not torch.isfinite(scaled).all():  # a temperature near 0 overflows: the same distribution, shifted to max 0
        scaled = (logits.float() - logits.float().amax(-1, keepdim=True)) / temperature
    probs = filter_logits(scaled, top_k=top_k, top_p=top_p).softmax(-1)
    if len(generators) == 1:
        return torch.multinomial(probs, 1, generator=generators[0]).squeeze(-1)
    return torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g)[:, 0] for i, g in enumerate(generators)])


SamplingUnit = Literal["bit", "byte"]


def resolve_sampling_unit(cfg, sampling_unit: Optional[str]) -> str:
    """The unit a model samples in: the given one if the model can, else its default (None)."""
    natural = {"flat": "bit", "patched": "byte"}.get(cfg.arch, "bit") if cfg.representation == "bit" else "byte"
    if sampling_unit is None:
        return natural
    if sampling_unit not in ("bit", "byte"):
        raise ValueError(f"sampling_unit must be 'bit' or 'byte', got {sampling_unit!r}")
    if cfg.representation != "bit" and sampling_unit == "bit":
        raise ValueError("sampling_unit='bit' needs a bit model; the byte baseline samples whole bytes")
    if cfg.representation == "bit" and cfg.arch != "patched" and sampling_unit == "byte":
        raise ValueError("sampling_unit='byte' needs a patched bit model; the flat bit model samples bit by bit")
    return sampling_unit


@torch.no_grad()
def generate_ids(model, prompt: torch.Tensor, n_new: int, *, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
                 use_cache: bool = True, row_seeds: Optional[list[int]] = None,
                 sampling_unit: Optional[SamplingUnit] = None) -> torch.Tensor:
    """Extend (B, T0) prompt ids by n_new sampled ids; returns (B, T0 + n_new).

    row_seeds: one generator per row instead of one for the batch (`seed`), so a row draws exactly
    what it would draw alone; the server batches independent requests this way.

    sampling_unit: what one draw picks, and so what temperature, top-k and top-p act on.
    "byte" (the default for patched models, the only unit of the byte baseline): the joint
    distribution over a byte's 2^bits_per_byte bit patterns (512 with parity, wrong-parity ones
    included at the model's mass; parity is enforced afterwards as ever), one draw and one global
    step per byte; the prompt and n_new must then be whole bytes; it needs the cache, so with
    use_cache=False the default is "bit". "bit" (the only unit of the
    flat bit model): each bit's 2-way distribution, so top-k >= 2 keeps both values. At
    temperature 1 without top-k/top-p both units draw from the same distribution; greedy
    (temperature 0) picks the most likely byte in one and the most likely bit at each step in the other.

    With the cache each new id costs one incremental step (for the patched model bit by bit: local
    steps, plus one global step per completed byte; byte at once: one draw and one global step per byte). When the context fills up, the oldest half is dropped on a
    byte boundary (so bit phases stay aligned) and the rest re-read. `use_cache=False` recomputes
    the whole prefix each step (the reference the cache is tested on).
    """
    _check_sampling(temperature, top_k, top_p)
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be (batch, length >= 1) ids, got shape {tuple(prompt.shape)}")
    cfg = model.config
    device = next(model.parameters()).device
    if row_seeds is not None:
        if len(row_seeds) != prompt.shape[0]:
            raise ValueError(f"row_seeds: {len(row_seeds)} seeds for {prompt.shape[0]} rows")
        generators = [torch.Generator(device=device).manual_seed(s) for s in row_seeds]
    else:
        generators = [torch.Generator(device=device)]
        if seed is None:
            generators[0].seed()  # fresh entropy for this call only; the global RNG is left alone
        else:
            generators[0].manual_seed(seed)
    seq = prompt.to(device)
    if sampling_unit is None and not use_cache:
        sampling_unit = "bit" if cfg.representation == "bit" else "byte"  # the recompute reference is bit by bit
    if resolve_sampling_unit(cfg, sampling_unit) == "byte" and cfg.representation == "bit":
        if not use_cache:
            raise ValueError("byte-at-once sampling decodes with the KV cache; use sampling_unit='bit' "
                             "for use_cache=False")
        return _generate_patched_bytes(model, seq, n_new, temperature, top_k, top_p, generators)
    unit = cfg.ids_per_byte
    keep_bytes = max(1, cfg.max_input_ids // 2 // unit)
    start, state = 0, None  # the context is seq[:, start:]
    with eval_mode(model):
        for _ in range(n_new):
            if seq.shape[1] - start > cfg.max_input_ids:
                start = seq.shape[1] - (keep_bytes * unit + seq.shape[1] % unit)
                state = None
            if not use_cache:
                logits = model(seq[:, start:], causal=True)[0][:, -1]
            elif state is None:
                state, logits = model.start_decoding(seq[:, start:])
            else:
                logits = model.decode_next(state, seq[:, -1])
            nxt = _pick(logits, temperature, top_k, top_p, generators)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    return seq


def _generate_patched_bytes(model, seq: torch.Tensor, n_new: int, temperature: float, top_k, top_p,
                            generators: list[torch.Generator]) -> torch.Tensor:
    """generate_ids for a patched model, one whole byte per draw (see sampling_unit there)."""
    cfg, body = model.config, model.body
    bpb = cfg.bits_per_byte
    if seq.shape[1] % bpb or n_new % bpb:
        raise ValueError(f"byte-at-once sampling needs whole bytes: prompt of {seq.shape[1]} bits and n_new={n_new} "
                         f"must be multiples of bits_per_byte={bpb} (or use sampling_unit='bit')")
    keep_ids = max(1, cfg.max_input_ids // 2 // bpb) * bpb
    start = max(0, seq.shape[1] - keep_ids) if seq.shape[1] > cfg.max_input_ids else 0
    new = []  # (B, bpb) bit blocks, concatenated once at the end
    with eval_mode(model):
        encodings = body.byte_encodings()  # one batched encoder pass instead of one per step
        state, _ = model.start_decoding(seq[:, start:])
        length = seq.shape[1] - start  # ids in the context
        for i in range(n_new // bpb):
            pattern = _pick(body.next_byte_log_probs(state), temperature, top_k, top_p, generators)
            bits = body.pattern_bits[pattern]  # (B, bpb)
            new.append(bits)
            if i == n_new // bpb - 1:
                break
            if length + bpb > cfg.max_input_ids:  # the context is full: keep its newest half and re-read it
                seq = torch.cat([seq, *new], dim=1)
                new = []
                state, _ = model.start_decoding(seq[:, -keep_ids:])
                length = keep_ids
            else:
                body.push_byte(state, bits, encodings[pattern])
                length += bpb
    return torch.cat([seq, *new], dim=1)


def generate(model, prompt: str | bytes, max_new_bytes: int, *, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
             use_cache: bool = True, sampling_unit: Optional[SamplingUnit] = None) -> Generation:
    """Continue a text prompt by max_new_bytes bytes, for a bit model or the byte baseline.

    sampling_unit: "bit" or "byte" (None: the model's default); see generate_ids.
    """
    if max_new_bytes < 0:
        raise ValueError(f"max_new_bytes must be >= 0, got {max_new_bytes}")
    data = prompt.encode("utf-8") if isinstance(prompt, str) else bytes(prompt)
    if not data:
        raise ValueError("prompt must be at least one byte (the model predicts from earlier positions)")
    ids = prompt_ids(model.config, data)[None]
    out = generate_ids(model, ids, max_new_bytes * model.config.ids_per_byte, temperature=temperature, top_k=top_k,
                       top_p=top_p, seed=seed, use_cache=use_cache, sampling_unit=sampling_unit)
    return to_generation(model.config, data, out[0, ids.shape[1]:])


def prompt_ids(cfg, data: bytes) -> torch.Tensor:
    """The (T,) ids a model reads for text bytes: their bits, or the bytes themselves."""
    if cfg.representation == "bit":
        return torch.as_tensor(bytes_to_bits(data, parity=cfg.parity), dtype=torch.long)
    return torch.as_tensor(list(data), dtype=torch.long)


def to_generation(cfg, prompt: bytes, new_ids: torch.Tensor) -> Generation:
    """A Generation from the sampled ids after `prompt`; bit models get parity enforced (and counted)."""
    new_ids = new_ids.cpu()
    if cfg.representation == "bit":
        bits, corrections = enforce_parity(new_ids.numpy()) if cfg.parity else (new_ids.numpy(), 0)
        new = bits_to_bytes(bits, parity=cfg.parity)
    else:
        new, corrections = bytes(new_ids.tolist()), 0
    return Generation(text=(prompt + new).decode("utf-8", errors="replace"), new_bytes=new,
                      n_parity_corrections=corrections)


def sample_text(model, prompt: str, max_new_bytes: int = 64, **kwargs) -> str:
    """The seeds' convenience call: prompt + continuation as text."""
    return generate(model, prompt, max_new_bytes, **kwargs).text


@torch.no_grad()
def infer_long_sequence(model, ids: torch.Tensor, *, window: Optional[int] = None,
                        overlap: Optional[int] = None, batch_windows: int = 8) -> torch.Tensor:
    """Logits for a sequence longer than the context, from overlapping windows.

    Windows of `window` positions start every `window - overlap` positions (rounded to whole
    bytes); each position's logits come from the first window in which it has at least `overlap`
    positions of context (or from the first window). Returns (B, T, V) for (B, T) or (T,) ids.
    """
    cfg = model.config
    squeeze = ids.dim() == 1
    ids = ids[None] if squeeze else ids
    step_unit = cfg.ids_per_byte
    window = window or cfg.max_input_ids
    window = window // step_unit * step_unit
    overlap = window // 2 if overlap is None else overlap
    overlap = overlap // step_unit * step_unit
    if not 0 < window <= cfg.max_input_ids:
        raise ValueError(f"window must be in [{step_unit}, {cfg.max_input_ids}] ids, got {window}")
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be in [0, window={window}), got {overlap}")
    device = next(model.parameters()).device
    ids = ids.to(device)
    B, T = ids.shape
    stride = window - overlap
    starts = list(range(0, max(T - overlap, 1), stride))
    full = [s for s in starts if s + window <= T]
    ragged = [s for s in starts if s + window > T]  # at most one: the tail window
    out = None
    with eval_mode(model):
        for i in range(0, len(full), batch_windows):
            group = full[i:i + batch_windows]
            stacked = torch.cat([ids[:, s:s + window] for s in group])  # (len(group) * B, window)
            logits, _ = model(stacked)
            out = _place(out, logits.view(len(group), B, window, -1), group, overlap, T)
        for start in ragged:
            logits, _ = model(ids[:, start:])
            out = _place(out, logits[None], [start], overlap, T)
    return out[0] if squeeze else out


def _place(out: Optional[torch.Tensor], logits: torch.Tensor, starts: list[int], overlap: int, T: int) -> torch.Tensor:
    """Copy (n_windows, B, W, V) window logits into the (B, T, V) output, skipping context positions."""
    if out is None:
        out = logits.new_empty(logits.shape[1], T, logits.shape[-1])
    for window_logits, start in zip(logits, starts):
        keep_from = 0 if start == 0 else overlap
        out[:, start + keep_from:start + window_logits.shape[1]] = window_logits[:, keep_from:]
    return out
