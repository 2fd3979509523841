"""Bit codec: UTF-8 text <-> MSB-first bit streams with an optional even-parity bit per byte."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_DATA_BITS = 8
# Rows are the MSB-first bits of each byte value; column 8 is the even-parity bit.
_BIT_TABLE = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1)
_BIT_TABLE = np.concatenate([_BIT_TABLE, (_BIT_TABLE.sum(axis=1) & 1)[:, None]], axis=1).astype(np.uint8)
# A parity-stream byte viewed as one unaligned 9-byte record, so its 8 data bits move as a single
# uint64 store; copying them as a strided 8-element row is several times slower.
_RECORD = np.dtype([("data", "<u8"), ("parity", "u1")])
# Large enough to amortise the per-chunk overhead, small enough that the unpacked bits stay in cache.
_CHUNK = 1 << 16

_torch_tables: dict[tuple[bool, torch.device], torch.Tensor] = {}
_torch_weights: dict[torch.device, torch.Tensor] = {}

BitsLike = Sequence[int] | np.ndarray | torch.Tensor


def bits_per_byte(parity: bool) -> int:
    """Number of bits each byte occupies in the stream: 9 with parity, 8 without."""
    return _DATA_BITS + 1 if parity else _DATA_BITS


def _byte_parity(values: np.ndarray) -> np.ndarray:
    """Even-parity bit of each uint8 value (1 where the popcount is odd)."""
    p = values ^ (values >> 4)
    p ^= p >> 2
    p ^= p >> 1
    p &= 1
    return p


def as_bit_array(bits: BitsLike) -> np.ndarray:
    """Flatten ``bits`` to a 1-D uint8 numpy array, raising ValueError on any value other than 0/1."""
    if isinstance(bits, torch.Tensor):
        # numpy has no bfloat16, and the values checked here are exact in float32.
        bits = bits.detach().cpu()
        bits = (bits.float() if bits.dtype == torch.bfloat16 else bits).numpy()
    arr = np.asarray(bits).reshape(-1)
    if arr.dtype == np.bool_:
        return arr.view(np.uint8)
    if arr.dtype.kind not in "uif":
        raise ValueError(f"bits must be an integer or bool array, got dtype {arr.dtype}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.uint8)
    if arr.dtype == np.uint8:
        ok = arr.max() <= 1
    elif arr.dtype.kind == "f":
        ok = bool(np.all((arr == 0) | (arr == 1)))
    else:
        ok = arr.min() >= 0 and arr.max() <= 1
    if not ok:
        bad = np.flatnonzero((arr != 0) & (arr != 1))
        first = int(bad[0])
        raise ValueError(
            f"bits must be 0 or 1: index {first} has value {arr[first].item()!r} ({bad.size} bad values in total)"
        )
    return arr if arr.dtype == np.uint8 else arr.astype(np.uint8)


def _as_byte_array(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise ValueError(f"byte arrays must have dtype uint8, got {data.dtype}")
        return data.reshape(-1)
    return np.frombuffer(data, dtype=np.uint8)


def bytes_to_bits(data: bytes | bytearray | np.ndarray, parity: bool = True) -> np.ndarray:
    """Expand bytes to a 1-D uint8 bit array, MSB first, each byte followed by its parity bit if asked."""
    arr = _as_byte_array(data)
    if not parity:
        return np.unpackbits(arr)
    out = np.empty(arr.size, dtype=_RECORD)
    data_field, parity_field = out["data"], out["parity"]
    for start in range(0, arr.size, _CHUNK):
        chunk = arr[start : start + _CHUNK]
        data_field[start : start + chunk.size] = np.unpackbits(chunk).view("<u8")
        parity_field[start : start + chunk.size] = _byte_parity(chunk)
    return out.view(np.uint8)


def text_to_bits(text: str, parity: bool = True) -> np.ndarray:
    """Encode ``text`` as UTF-8 and expand it to bits (see ``bytes_to_bits``)."""
    return bytes_to_bits(text.encode("utf-8"), parity=parity)


def _split_stream(bits: BitsLike, parity: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate a bit stream and return (data bytes, stored parity bits or None)."""
    arr = as_bit_array(bits)
    bpb = bits_per_byte(parity)
    if arr.size % bpb:
        raise ValueError(
            f"bit stream length {arr.size} is not a multiple of {bpb} bits per byte (parity={parity})"
        )
    if not parity:
        return np.packbits(arr), None
    records = np.ascontiguousarray(arr).view(_RECORD)
    data = np.empty(records.size, dtype=np.uint8)
    stored = np.empty(records.size, dtype=np.uint8)
    for start in range(0, records.size, _CHUNK):
        block = records[start : start + _CHUNK]
        stop = start + block.size
        data[start:stop] = np.packbits(np.ascontiguousarray(block["data"]).view(np.uint8))
        stored[start:stop] = block["parity"]
    return data, stored


def bits_to_bytes(bits: BitsLike, parity: bool = True, repair: bool = False) -> bytes:
    """Pack a bit stream back into bytes, checking each parity bit unless ``repair`` says to ignore them."""
    data, stored = _split_stream(bits, parity)
    if stored is not None and not repair:
        wrong = _byte_parity(data) != stored
        if wrong.any():
            bad = np.flatnonzero(wrong)
            raise ValueError(
                f"parity error at byte {int(bad[0])} (bit offset {int(bad[0]) * bits_per_byte(parity)}); "
                f"{bad.size} bytes have a wrong parity bit"
            )
    return data.tobytes()


def bits_to_text(bits: BitsLike, parity: bool = True, errors: str = "strict", repair: bool = False) -> str:
    """Decode a bit stream to text: ``bits_to_bytes`` then UTF-8, strictly or with U+FFFD replacement."""
    if errors not in ("strict", "replace"):
        raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
    raw = bits_to_bytes(bits, parity=parity, repair=repair)
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"invalid UTF-8 at byte offset {exc.start} (bytes {raw[exc.start:exc.end]!r}: {exc.reason})"
        ) from exc


def enforce_parity(bits: BitsLike) -> tuple[np.ndarray, int]:
    """Rewrite every parity bit of a parity stream to even parity; return (fixed bits, bytes changed)."""
    arr = as_bit_array(bits)
    bpb = bits_per_byte(True)
    if arr.size % bpb:
        raise ValueError(f"parity stream length {arr.size} is not a multiple of {bpb} bits per byte")
    fixed = arr.reshape(-1, bpb).copy()
    data, stored = _split_stream(arr, parity=True)
    correct = _byte_parity(data)
    n_changed = int(np.count_nonzero(stored != correct))
    fixed[:, _DATA_BITS] = correct
    return fixed.reshape(-1), n_changed


def pack_bits(bits: BitsLike) -> bytes:
    """Pack an arbitrary bit array densely, 8 bits per byte, MSB first, zero-padded at the end."""
    return np.packbits(as_bit_array(bits)).tobytes()


def unpack_bits(packed: bytes | bytearray, n_bits: int) -> np.ndarray:
    """Inverse of ``pack_bits``: the first ``n_bits`` bits of ``packed`` as a uint8 array."""
    capacity = 8 * len(packed)
    if not 0 <= n_bits <= capacity:
        raise ValueError(f"n_bits={n_bits} is outside [0, {capacity}] for {len(packed)} packed bytes")
    return np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=n_bits)


def bit_table(parity: bool, device: torch.device | str | None = None) -> torch.Tensor:
    """(256, bits_per_byte) long tensor whose row v holds the bits of byte v (and its parity bit).

    The tensor is cached per (parity, device) and shared: treat it as read-only.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    key = (bool(parity), dev)
    table = _torch_tables.get(key)
    if table is None:
        cols = bits_per_byte(parity)
        table = torch.from_numpy(_BIT_TABLE[:, :cols].astype(np.int64)).to(dev)
        _torch_tables[key] = table
    return table


def bytes_to_bit_tensor(x: torch.Tensor, parity: bool = True) -> torch.Tensor:
    """Map byte values (..., L) to bits (..., L * bits_per_byte) by table lookup on x's device."""
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"byte tensor must have an integer dtype, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("byte tensor must have at least one dimension (..., L)")
    # A range check needs a host sync, which would stall an accelerator's queue every batch;
    # there an out-of-range value trips the device's own index assertion instead.
    if x.device.type == "cpu" and x.numel() and (int(x.min()) < 0 or int(x.max()) > 255):
        first = tuple(torch.nonzero((x < 0) | (x > 255))[0].tolist())
        raise ValueError(f"byte values must be in [0, 255]: index {first} has value {int(x[first])}")
    table = bit_table(parity, x.device)
    bits = table[x.long()]
    return bits.reshape(*x.shape[:-1], x.shape[-1] * table.shape[1])


def bit_tensor_to_bytes(bits: torch.Tensor, parity: bool = True) -> torch.Tensor:
    """Map bits (..., L * bits_per_byte) back to byte values (..., L), ignoring parity bits."""
    bpb = bits_per_byte(parity)
    if bits.dim() == 0 or bits.shape[-1] % bpb:
        raise ValueError(
            f"last dimension of bit tensor shape {tuple(bits.shape)} is not a multiple of {bpb} bits per byte"
        )
    weights = _torch_weights.get(bits.device)
    if weights is None:
        weights = (1 << torch.arange(_DATA_BITS - 1, -1, -1, dtype=torch.long)).to(bits.device)
        _torch_weights[bits.device] = weights
    grouped = bits.reshape(*bits.shape[:-1], bits.shape[-1] // bpb, bpb)[..., :_DATA_BITS]
    return (grouped.long() * weights).sum(dim=-1)
