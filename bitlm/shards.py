"""Parquet shard files of fixed-size byte windows: writing, reading back and checksums."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
