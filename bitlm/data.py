"""Prepared byte corpora: Parquet window shards on disk and uint8 window readers over them."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .shards import check_shards, file_sha256, read_shard, write_shards
from .corpus_sources import DEFAULT_INCLUDE, plan_stream, read_stream, resolve_sources

FORMAT = "bitlm-corpus/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
_SHARD_NAME = re.compile(r"^(train|val)-\d{5,}\.parquet$")  # as bitlm.shards.write_shards names them
# (256, 8) table of each byte's bits, most significant first, so histograms map to bit counts.
_BYTE_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(np.int64)
_BYTE_PARITY = _BYTE_BITS.sum(axis=1) & 1


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return int(value)


def _check_split_args(window_bytes: int, val_fraction: float) -> None:
    _check_int("window_bytes", window_bytes, 2)
    if not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")


def split_sizes(n_bytes: int, window_bytes: int, val_fraction: float) -> dict[str, tuple[int, int]]:
    """(n_windows, n_bytes_dropped) of each split of an n_bytes stream; raises if a split needs a window and gets none."""
    _check_split_args(window_bytes, val_fraction)
    n_train = int(n_bytes * (1.0 - val_fraction))
    out = {}
    for name, n in (("train", n_train), ("val", n_bytes - n_train)):
        n_windows = n // window_bytes
        if n_windows == 0 and (name == "train" or val_fraction > 0):
            raise ValueError(
                f"corpus too small for window_bytes={window_bytes}: the {name} split has "
                f"{n} bytes (stream {n_bytes} bytes, val_fraction={val_fraction}); "
                "add data or lower window_bytes")
        out[name] = (n_windows, n - n_windows * window_bytes)
    return out


def split_windows(stream: np.ndarray, window_bytes: int,
                  val_fraction: float) -> dict[str, tuple[np.ndarray, int]]:
    """Split a byte stream contiguously into train/val windows: {split: (windows, n_bytes_dropped)}."""
    stream = np.asarray(stream, dtype=np.uint8).reshape(-1)
    (n_train, train_dropped), (n_val, val_dropped) = split_sizes(len(stream), window_bytes, val_fraction).values()
    val_start = n_train * window_bytes + train_dropped
    return {"train": (stream[:n_train * window_bytes].reshape(n_train, window_bytes), train_dropped),
            "val": (stream[val_start:val_start + n_val * window_bytes].reshape(n_val, window_bytes), val_dropped)}


def byte_histogram(data: np.ndarray) -> np.ndarray:
    """(256,) int64 count of each byte value."""
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    hist = np.zeros(256, dtype=np.int64)
    # bincount widens its input to intp: 1 MiB chunks bound that copy and run ~2.7x faster than one call.
    for start in range(0, len(data), 1 << 20):
        hist += np.bincount(data[start:start + (1 << 20)], minlength=256)
    return hist


def _marginals(hist: np.ndarray, parity: bool) -> np.ndarray:
    ones = hist @ _BYTE_BITS
    if parity:
        # Even parity: the extra bit is 1 exactly when the data bits hold an odd number of ones.
        ones = np.append(ones, hist @ _BYTE_PARITY)
    return (ones + 1) / (hist.sum() + 2)


def bit_marginals(data: np.ndarray, parity: bool) -> np.ndarray:
    """Laplace-smoothed frequency of 1-bits at each bit phase of a byte (9 phases with parity, else 8)."""
    return _marginals(byte_histogram(data), parity)


def _split_entry(windows: np.ndarray, dropped: int, shards: list[dict]) -> dict:
    return {"n_windows": int(windows.shape[0]), "n_bytes": int(windows.size),
            "n_bytes_dropped": int(dropped), "shards": shards}


def _manifest(window_bytes: int, val_fraction: float, sources: list[str], n_files: int,
              n_bytes_total: int, splits: dict[str, tuple[np.ndarray, int]],
              shards: dict[str, list[dict]], train_histogram: np.ndarray | None = None) -> dict:
    hist = byte_histogram(splits["train"][0]) if train_histogram is None else train_histogram
    return {
        "format": FORMAT,
        "window_bytes": int(window_bytes),
        "val_fraction": float(val_fraction),
        "sources": list(sources),
        "n_files": int(n_files),
        "n_bytes_total": int(n_bytes_total),
        "splits": {name: _split_entry(w, d, shards.get(name, [])) for name, (w, d) in splits.items()},
        "phase_marginals": {str(n): _marginals(hist, parity=n == 9).tolist() for n in (9, 8)},
    }


def check_prepare_args(window_bytes: int, val_fraction: float, shard_windows: int,
                       max_bytes: int | None) -> None:
    """Raise ValueError naming the first option of a corpus preparation that is out of range."""
    _check_split_args(window_bytes, val_fraction)
    _check_int("shard_windows", shard_windows, 1)
    if max_bytes is not None:
        _check_int("max_bytes", max_bytes, 1)


def write_corpus(stream: np.ndarray, out_dir: str | Path, *, sources: list[str], n_files: int,
                 window_bytes: int, val_fraction: float, shard_windows: int,
                 train_histogram: np.ndarray | None = None) -> dict:
    """Split a read stream into train/val shards under out_dir, write manifest.json last and return it.

    train_histogram, the byte counts of the train windows, is computed here when not given.
    """
    splits = split_windows(stream, window_bytes, val_fraction)
    out = Path(out_dir)
    _check_not_foreign_manifest(out / MANIFEST)
    out.mkdir(parents=True, exist_ok=True)
    # Drop the old manifest first so a rebuild that fails midway never looks complete; then the
    # old shards, by their exact names only (nothing else in out_dir is ours to delete).
    (out / MANIFEST).unlink(missing_ok=True)
    for stale in out.glob("*.parquet"):
        if _SHARD_NAME.match(stale.name):
            stale.unlink()
    shards = {name: write_shards(out, name, w, shard_windows) for name, (w, _) in splits.items()}
    manifest = _manifest(window_bytes, val_fraction, sources, n_files, len(stream), splits, shards,
                         train_histogram)
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)
    return manifest


def _check_not_foreign_manifest(path: Path) -> None:
    """Refuse to replace a manifest.json that is not a corpus manifest of ours."""
    if not path.exists():
        return
    try:
        ours = json.loads(path.read_text()).get("format") == FORMAT
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ValueError(f"{path} exists and is not a bitlm corpus manifest; prepare into another --out "
                         "(nothing was changed)")


def prepare_corpus(sources: Sequence[str | os.PathLike] | None, out_dir: str | Path, *,
                   window_bytes: int = 1024, val_fraction: float = 0.1, shard_windows: int = 8192,
                   max_bytes: int | None = None, include: tuple[str, ...] = DEFAULT_INCLUDE,
                   progress: bool = True) -> dict:
    """Read sources into train/val Parquet window shards under out_dir and return the manifest."""
    check_prepare_args(window_bytes, val_fraction, shard_windows, max_bytes)
    given, paths = resolve_sources(sources, include)
    plan = plan_stream(paths, max_bytes)
    split_sizes(plan.n_bytes, window_bytes, val_fraction)  # too small: fail before reading
    # The whole stream is held in memory; max_bytes bounds it for large sources.
    with tqdm(total=plan.n_bytes, unit="B", unit_scale=True, desc="reading", disable=not progress) as bar:
        stream = read_stream(plan, on_read=bar.update)
    return write_corpus(stream, out_dir, sources=given, n_files=plan.n_files, window_bytes=window_bytes,
                        val_fraction=val_fraction, shard_windows=shard_windows)


def read_manifest(corpus_dir: str | Path) -> dict:
    """Load and check a prepared corpus's manifest.json; ValueError naming the file and what is wrong."""
    path = Path(corpus_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST} in {corpus_dir}; create the corpus with `bitlm prepare`")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); re-run `bitlm prepare`") from None
    _check_manifest(manifest, path)
    return manifest


def _check_manifest(manifest, path: Path) -> None:
    """Raise ValueError naming `path` and the first field of a manifest that is missing or malformed."""
    def bad(what: str) -> ValueError:
        return ValueError(f"{path}: {what}; re-run `bitlm prepare`")

    if not isinstance(manifest, dict):
        raise bad(f"must be a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format must be {FORMAT!r}, got {manifest.get('format')!r}")
    window_bytes = manifest.get("window_bytes")
    if isinstance(window_bytes, bool) or not isinstance(window_bytes, int) or window_bytes < 2:
        raise bad(f"window_bytes must be an integer >= 2, got {window_bytes!r}")
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or any(not isinstance(splits.get(name), dict) for name in SPLITS):
        raise bad(f"splits must be an object with {' and '.join(SPLITS)} entries")
    for name in SPLITS:
        shards = splits[name].get("shards")
        if not isinstance(shards, list):
            raise bad(f"splits.{name}.shards must be a list")
        for i, shard in enumerate(shards):
            ok = (isinstance(shard, dict) and isinstance(shard.get("file"), str)
                  and shard["file"] == Path(shard["file"]).name and shard["file"] not in ("", ".", "..")
                  and isinstance(shard.get("sha256"), str) and isinstance(shard.get("n_windows"), int)
                  and not isinstance(shard["n_windows"], bool) and shard["n_windows"] >= 0)
            if not ok:
                raise bad(f"splits.{name}.shards[{i}] must hold a file name in the corpus directory, "
                          "its sha256 and n_windows")
    marginals = manifest.get("phase_marginals")
    if not isinstance(marginals, dict) or any(
            not isinstance(marginals.get(n), list) or len(marginals[n]) != int(n) for n in ("8", "9")):
        raise bad("phase_marginals must hold lists of 8 and 9 per-phase frequencies")


def verify_shards(corpus_dir: str | Path, manifest: dict | None = None) -> None:
    """Check every shard's sha256 against the manifest; ValueError naming the first shard that differs."""
    manifest = read_manifest(corpus_dir) if manifest is None else manifest
    check_shards(Path(corpus_dir), [s for name in SPLITS for s in manifest["splits"][name]["shards"]])


def corpus_identity(manifest: dict) -> str:
    """A hex digest naming a corpus's contents: its window size and every shard's name, size and sha256."""
    content = {"window_bytes": manifest["window_bytes"],
               "splits": {name: [[s["file"], s["n_windows"], s["sha256"]] for s in manifest["splits"][name]["shards"]]
                          for name in SPLITS}}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


class ByteWindows:
    """One split as a (n_windows, window_bytes) uint8 array."""

    def __init__(self, windows: np.ndarray):
        if windows.dtype != np.uint8 or windows.ndim != 2 or windows.shape[1] < 2:
            raise ValueError(f"windows must be a uint8 array of shape (n, window_bytes >= 2), "
                             f"got {windows.dtype} {windows.shape}")
        self._windows = windows

    @classmethod
    def open(cls, corpus_dir: str | Path, split: str = "train", verify: bool = False,
             manifest: dict | None = None) -> "ByteWindows":
        """Load one split of a prepared corpus from its memory-mapped shards; verify checks sha256s."""
        manifest = read_manifest(corpus_dir) if manifest is None else manifest
        if split not in manifest["splits"]:
            raise ValueError(f"split must be one of {sorted(manifest['splits'])}, got {split!r}")
        window_bytes = manifest["window_bytes"]
        shards = manifest["splits"][split]["shards"]
        # Parquet decoding copies page data into Arrow buffers even from a memory map (pages carry
        # headers between them), so nothing stays zero-copy from the file. Each shard is decoded and
        # copied into one preallocated array, then released: peak memory is the split plus one
        # shard, and batches gather from a single array instead of looking up shards per crop.
        out = np.empty((sum(s["n_windows"] for s in shards), window_bytes), dtype=np.uint8)
        row = 0
        for shard in shards:
            path = Path(corpus_dir) / shard["file"]
            if verify and file_sha256(path) != shard["sha256"]:
                raise ValueError(f"shard {path}: sha256 does not match the manifest "
                                 "(file corrupted or replaced); re-run `bitlm prepare`")
            views = read_shard(path, window_bytes)
            n = sum(v.shape[0] for v in views)
            if n != shard["n_windows"]:
                raise ValueError(f"shard {path}: has {n} windows, "
                                 f"manifest says {shard['n_windows']}; re-run `bitlm prepare`")
            for view in views:
                out[row:row + len(view)] = view
                row += len(view)
        out.flags.writeable = False
        return cls(out)

    @classmethod
    def from_bytes(cls, data: bytes, window_bytes: int) -> "ByteWindows":
        """Cut in-memory bytes into windows, dropping a trailing partial window."""
        _check_int("window_bytes", window_bytes, 2)
        arr = np.frombuffer(data, dtype=np.uint8)
        n = len(arr) // window_bytes
        return cls(arr[:n * window_bytes].reshape(n, window_bytes))

    @property
    def n_windows(self) -> int:
        """Number of windows in the split."""
        return self._windows.shape[0]

    @property
    def window_bytes(self) -> int:
        """Bytes per window."""
        return self._windows.shape[1]

    @property
    def n_bytes(self) -> int:
        """Bytes held in windows."""
        return self._windows.size

    def __len__(self) -> int:
        return self.n_windows

    def to_numpy(self) -> np.ndarray:
        """The (n_windows, window_bytes) array itself, read-only where it came from a file or bytes."""
        return self._windows

    def _gather(self, context_bytes: int) -> Callable[[np.ndarray, np.ndarray], torch.Tensor]:
        # A (n, window_bytes - context_bytes + 1, context_bytes) strided view: crop (row, offset) is
        # crops[row, offset], so a batch is one fancy-index copy of whole contiguous crops.
        crops = np.lib.stride_tricks.sliding_window_view(self._windows, context_bytes, axis=1)
        return lambda rows, offsets: torch.from_numpy(crops[rows, offsets])

    def _check_crop(self, batch_size: int, context_bytes: int) -> None:
        _check_int("batch_size", batch_size, 1)
        _check_int("context_bytes", context_bytes, 2, self.window_bytes)

    def random_batches(self, batch_size: int, context_bytes: int, *, seed: int, start_step: int = 0,
                       rank: int = 0, world_size: int = 1) -> Iterator[torch.Tensor]:
        """Endless uint8 (batch_size, context_bytes) random crops; step s depends only on (seed, rank, s)."""
        self._check_crop(batch_size, context_bytes)
        _check_int("seed", seed, 0)
        _check_int("start_step", start_step, 0)
        if self.n_windows == 0:
            raise ValueError("random_batches needs a split with at least one window, this one has none")
        _check_int("world_size", world_size, 1, self.n_windows)
        _check_int("rank", rank, 0, world_size - 1)
        # Rank r owns windows r, r + world_size, ...; count them without materialising the list.
        n_owned = len(range(rank, self.n_windows, world_size))
        max_offset = self.window_bytes - context_bytes
        gather = self._gather(context_bytes)

        def batches() -> Iterator[torch.Tensor]:
            for step in itertools.count(start_step):
                rng = np.random.default_rng([seed, rank, step])
                rows = rank + world_size * rng.integers(0, n_owned, size=batch_size)
                offsets = rng.integers(0, max_offset + 1, size=batch_size)
                yield gather(rows, offsets)
        return batches()

    def sequential_batches(self, batch_size: int, context_bytes: int, *,
                           max_batches: int | None = None) -> Iterator[torch.Tensor]:
        """Non-overlapping crops in window order, batched, last partial batch kept; for evaluation."""
        self._check_crop(batch_size, context_bytes)
        if max_batches is not None:
            _check_int("max_batches", max_batches, 0)
        per_window = self.window_bytes // context_bytes
        n_crops = self.n_windows * per_window
        starts = range(0, n_crops, batch_size)
        if max_batches is not None:
            starts = starts[:max_batches]
        gather = self._gather(context_bytes)

        def batches() -> Iterator[torch.Tensor]:
            for start in starts:
                rows, slot = np.divmod(np.arange(start, min(start + batch_size, n_crops)), per_window)
                yield gather(rows, slot * context_bytes)
        return batches()


class Corpus:
    """A prepared corpus: train and val windows plus the manifest that describes them."""

    def __init__(self, train: ByteWindows, val: ByteWindows, manifest: dict,
                 directory: Path | None = None):
        self.train = train
        self.val = val
        self.manifest = manifest
        self.directory = directory

    @classmethod
    def open(cls, directory: str | Path, verify: bool = True) -> "Corpus":
        """Open a directory written by prepare_corpus, first checking every shard's sha256 unless not `verify`.

        The check reads the shards once more (about 1 GB/s; a progress bar from 256 MiB on a
        terminal); verify=False skips it for corpora too large to hash at every start.
        """
        manifest = read_manifest(directory)
        if verify:
            verify_shards(directory, manifest)
        train = ByteWindows.open(directory, "train", manifest=manifest)
        val = ByteWindows.open(directory, "val", manifest=manifest)
        return cls(train, val, manifest, Path(directory))

    @classmethod
    def from_bytes(cls, data: bytes, *, window_bytes: int = 1024, val_fraction: float = 0.1) -> "Corpus":
        """Build an in-memory corpus with the same split and marginals as prepare_corpus."""
        stream = np.frombuffer(data, dtype=np.uint8)
        splits = split_windows(stream, window_bytes, val_fraction)
        manifest = _manifest(window_bytes, val_fraction, [], 0, len(stream), splits, {})
        return cls(ByteWindows(splits["train"][0]), ByteWindows(splits["val"][0]), manifest)

    def phase_marginals(self, parity: bool) -> np.ndarray:
        """Per-phase 1-bit frequencies of the train split: 9 values with parity, 8 without."""
        return np.asarray(self.manifest["phase_marginals"]["9" if parity else "8"], dtype=np.float64)
