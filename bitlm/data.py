"""Prepared byte corpora: Parquet window shards on disk and uint8 window readers over them."""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import itertools
import json
import os
import sysconfig
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

FORMAT = "bitlm-corpus/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
DEFAULT_INCLUDE = ("*.py", "*.txt", "*.md", "*.rst")
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
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


def _walk(root: Path, patterns: Sequence[str], skip_dirs: frozenset = frozenset()) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs]
        for name in filenames:
            if any(fnmatch.fnmatch(name, p) for p in patterns):
                found.append(Path(dirpath) / name)
    return found


def resolve_sources(sources: Sequence[str | os.PathLike] | None,
                    include: Sequence[str] = DEFAULT_INCLUDE) -> tuple[list[str], list[Path]]:
    """Expand sources into (the source strings recorded, the sorted unique files to read)."""
    if sources is None:
        stdlib = sysconfig.get_paths()["stdlib"]
        files = _walk(Path(stdlib), ("*.py",), _SKIP_DIRS)
        if not files:
            raise ValueError(f"sources: no *.py files found in the standard library at {stdlib}")
        return [stdlib], sorted({f.resolve() for f in files}, key=str)
    if isinstance(sources, (str, os.PathLike)):
        raise ValueError(f"sources must be a list of paths or patterns, got the single path {sources!r}")
    given = [os.fspath(s) for s in sources]
    files: set[Path] = set()
    for source in given:
        path = Path(source)
        if path.is_file():
            matched = [path]
        elif path.is_dir():
            matched = _walk(path, include)
        elif glob.has_magic(source):
            matched = []
            for hit in map(Path, glob.glob(source, recursive=True)):
                if hit.is_file():
                    matched.append(hit)
                elif hit.is_dir():
                    matched.extend(_walk(hit, include))
        else:
            matched = []
        if not matched:
            raise ValueError(f"sources: {source!r} matches no file (include={tuple(include)})")
        files.update(m.resolve() for m in matched)
    return given, sorted(files, key=str)


def _read_stream(paths: Sequence[Path], max_bytes: int | None, progress: bool) -> tuple[np.ndarray, int]:
    """Concatenate files with b"\\n" between them, up to max_bytes; returns (stream, files read)."""
    sizes = [p.stat().st_size for p in paths]
    cap = sum(sizes) + max(len(paths) - 1, 0)
    if max_bytes is not None:
        cap = min(cap, max_bytes)
    buf = np.empty(cap, dtype=np.uint8)
    view = memoryview(buf)
    pos = n_files = 0
    with tqdm(total=cap, unit="B", unit_scale=True, desc="reading", disable=not progress) as bar:
        for i, (path, size) in enumerate(zip(paths, sizes)):
            if pos >= cap:
                break
            if i:
                buf[pos] = 0x0A
                pos += 1
            end = min(pos + size, cap)
            start = pos
            with open(path, "rb", buffering=0) as f:
                # A file that shrank since stat() just yields less; one that grew is cut at its stat size.
                while pos < end:
                    got = f.readinto(view[pos:end])
                    if not got:
                        break
                    pos += got
            n_files += 1
            bar.update(pos - start + (1 if i else 0))
    return buf[:pos], n_files


def split_windows(stream: np.ndarray, window_bytes: int,
                  val_fraction: float) -> dict[str, tuple[np.ndarray, int]]:
    """Split a byte stream contiguously into train/val windows: {split: (windows, n_bytes_dropped)}."""
    _check_split_args(window_bytes, val_fraction)
    stream = np.asarray(stream, dtype=np.uint8).reshape(-1)
    n_train = int(len(stream) * (1.0 - val_fraction))
    out = {}
    for name, part in (("train", stream[:n_train]), ("val", stream[n_train:])):
        n_windows = len(part) // window_bytes
        if n_windows == 0 and (name == "train" or val_fraction > 0):
            raise ValueError(
                f"corpus too small for window_bytes={window_bytes}: the {name} split has "
                f"{len(part)} bytes (stream {len(stream)} bytes, val_fraction={val_fraction}); "
                "add data or lower window_bytes")
        kept = n_windows * window_bytes
        out[name] = (part[:kept].reshape(n_windows, window_bytes), len(part) - kept)
    return out


def bit_marginals(data: np.ndarray, parity: bool) -> np.ndarray:
    """Laplace-smoothed frequency of 1-bits at each bit phase of a byte (9 phases with parity, else 8)."""
    hist = np.bincount(np.asarray(data, dtype=np.uint8).reshape(-1), minlength=256).astype(np.int64)
    ones = hist @ _BYTE_BITS
    if parity:
        # Even parity: the extra bit is 1 exactly when the data bits hold an odd number of ones.
        ones = np.append(ones, hist @ _BYTE_PARITY)
    return (ones + 1) / (hist.sum() + 2)


def _split_entry(windows: np.ndarray, dropped: int, shards: list[dict]) -> dict:
    return {"n_windows": int(windows.shape[0]), "n_bytes": int(windows.size),
            "n_bytes_dropped": int(dropped), "shards": shards}


def _manifest(window_bytes: int, val_fraction: float, sources: list[str], n_files: int,
              n_bytes_total: int, splits: dict[str, tuple[np.ndarray, int]],
              shards: dict[str, list[dict]]) -> dict:
    train = splits["train"][0]
    return {
        "format": FORMAT,
        "window_bytes": int(window_bytes),
        "val_fraction": float(val_fraction),
        "sources": list(sources),
        "n_files": int(n_files),
        "n_bytes_total": int(n_bytes_total),
        "splits": {name: _split_entry(w, d, shards.get(name, [])) for name, (w, d) in splits.items()},
        "phase_marginals": {str(n): bit_marginals(train, parity=n == 9).tolist() for n in (9, 8)},
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_shards(out_dir: Path, split: str, windows: np.ndarray, shard_windows: int) -> list[dict]:
    window_bytes = windows.shape[1]
    shards = []
    for i, start in enumerate(range(0, windows.shape[0], shard_windows)):
        part = np.ascontiguousarray(windows[start:start + shard_windows])
        column = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(window_bytes), part.shape[0], [None, pa.py_buffer(part)])
        path = out_dir / f"{split}-{i:05d}.parquet"
        # Uncompressed PLAIN pages read fastest here; min/max statistics of raw windows are useless.
        pq.write_table(pa.table({"window": column}), path, compression="none",
                       use_dictionary=False, write_statistics=False)
        shards.append({"file": path.name, "n_windows": int(part.shape[0]),
                       "n_bytes": path.stat().st_size, "sha256": _sha256(path)})
    return shards


def prepare_corpus(sources: Sequence[str | os.PathLike] | None, out_dir: str | Path, *,
                   window_bytes: int = 1024, val_fraction: float = 0.1, shard_windows: int = 8192,
                   max_bytes: int | None = None, include: tuple[str, ...] = DEFAULT_INCLUDE,
                   progress: bool = True) -> dict:
    """Read sources into train/val Parquet window shards under out_dir and return the manifest."""
    _check_split_args(window_bytes, val_fraction)
    _check_int("shard_windows", shard_windows, 1)
    if max_bytes is not None:
        _check_int("max_bytes", max_bytes, 1)
    given, paths = resolve_sources(sources, include)
    # The whole stream is held in memory; max_bytes bounds it for large sources.
    stream, n_files = _read_stream(paths, max_bytes, progress)
    splits = split_windows(stream, window_bytes, val_fraction)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Drop the old manifest first so a rebuild that fails midway never looks complete.
    (out / MANIFEST).unlink(missing_ok=True)
    for name in SPLITS:
        for stale in out.glob(f"{name}-*.parquet"):
            stale.unlink()
    shards = {name: _write_shards(out, name, w, shard_windows) for name, (w, _) in splits.items()}
    manifest = _manifest(window_bytes, val_fraction, given, n_files, len(stream), splits, shards)
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)
    return manifest


def read_manifest(corpus_dir: str | Path) -> dict:
    """Load and check a prepared corpus's manifest.json."""
    path = Path(corpus_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST} in {corpus_dir}; create the corpus with `bitlm prepare`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format must be {FORMAT!r}, got {manifest.get('format')!r}")
    return manifest


def _shard_windows(path: Path, window_bytes: int) -> list[np.ndarray]:
    """Zero-copy (n, window_bytes) uint8 views over the decoded Arrow chunks of one shard."""
    # ParquetFile.read avoids read_table's one-off ~0.3 s import of the dataset layer.
    with pq.ParquetFile(path, memory_map=True) as f:
        column = f.read(columns=["window"]).column("window")
    if column.type != pa.binary(window_bytes):
        raise ValueError(f"shard {path.name}: column type must be {pa.binary(window_bytes)}, "
                         f"got {column.type}")
    views = []
    for chunk in column.chunks:
        if chunk.null_count:
            raise ValueError(f"shard {path.name}: window column has {chunk.null_count} nulls")
        data = np.frombuffer(chunk.buffers()[1], dtype=np.uint8,
                             count=len(chunk) * window_bytes, offset=chunk.offset * window_bytes)
        views.append(data.reshape(len(chunk), window_bytes))
    return views


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
            if verify and _sha256(path) != shard["sha256"]:
                raise ValueError(f"shard {shard['file']}: sha256 does not match the manifest "
                                 "(file corrupted or replaced); re-run `bitlm prepare`")
            views = _shard_windows(path, window_bytes)
            n = sum(v.shape[0] for v in views)
            if n != shard["n_windows"]:
                raise ValueError(f"shard {shard['file']}: has {n} windows, "
                                 f"manifest says {shard['n_windows']}")
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
    def open(cls, directory: str | Path, verify: bool = False) -> "Corpus":
        """Open a directory written by prepare_corpus."""
        manifest = read_manifest(directory)
        train = ByteWindows.open(directory, "train", verify=verify, manifest=manifest)
        val = ByteWindows.open(directory, "val", verify=verify, manifest=manifest)
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
