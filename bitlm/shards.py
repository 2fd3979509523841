"""Parquet shard files of fixed-size byte windows: writing, reading back and checksums."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

# shards this large in all show a progress bar while they are checked (on a terminal)
_CHECK_BAR_BYTES = 256 << 20


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_shards(directory: Path, shards: list[dict]) -> None:
    """Compare each shard file's sha256 with its manifest entry; raise naming the first one missing or different."""
    paths = [directory / s["file"] for s in shards]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"shard {path}: missing; re-run `bitlm prepare`")
    total = sum(p.stat().st_size for p in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc="checking shards",
              disable=None if total >= _CHECK_BAR_BYTES else True) as bar:
        for shard, path in zip(shards, paths):
            if file_sha256(path) != shard["sha256"]:
                raise ValueError(f"shard {path}: sha256 does not match the manifest (file corrupted or replaced); "
                                 "re-run `bitlm prepare`, or skip the check (bitlm train --no-verify-data)")
            bar.update(path.stat().st_size)


def write_shards(out_dir: Path, split: str, windows: np.ndarray, shard_windows: int) -> list[dict]:
    """Write (n, window_bytes) windows as {split}-NNNNN.parquet, shard_windows rows each; returns their entries."""
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
                       "n_bytes": path.stat().st_size, "sha256": file_sha256(path)})
    return shards


def read_shard(path: Path, window_bytes: int) -> list[np.ndarray]:
    """Zero-copy (n, window_bytes) uint8 views over the decoded Arrow chunks of one shard."""
    # ParquetFile.read avoids read_table's one-off ~0.3 s import of the dataset layer.
    try:
        with pq.ParquetFile(path, memory_map=True) as f:
            column = f.read(columns=["window"]).column("window")
    except FileNotFoundError:
        raise FileNotFoundError(f"shard {path}: missing; re-run `bitlm prepare`") from None
    except (pa.ArrowException, OSError, KeyError) as err:  # truncated, not Parquet, or no window column
        raise ValueError(f"shard {path}: unreadable ({err}); re-run `bitlm prepare`") from None
    if column.type != pa.binary(window_bytes):
        raise ValueError(f"shard {path}: column type must be {pa.binary(window_bytes)}, "
                         f"got {column.type}")
    views = []
    for chunk in column.chunks:
        if chunk.null_count:
            raise ValueError(f"shard {path}: window column has {chunk.null_count} nulls")
        data = np.frombuffer(chunk.buffers()[1], dtype=np.uint8,
                             count=len(chunk) * window_bytes, offset=chunk.offset * window_bytes)
        views.append(data.reshape(len(chunk), window_bytes))
    return views
