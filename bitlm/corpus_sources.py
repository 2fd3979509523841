"""Corpus source files: finding them, and laying them out and reading them as one byte stream."""

from __future__ import annotations

import bisect
import fnmatch
import glob
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

DEFAULT_INCLUDE = ("*.py", "*.txt", "*.md", "*.rst")
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


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


@dataclass(frozen=True)
class StreamPlan:
    """Where each file sits in the stream: files in order, joined by b"\\n", cut at max_bytes."""

    paths: tuple[str, ...]  # strings, not Paths: a plan sent to every Ray task unpickles 100x faster
    starts: tuple[int, ...]  # stream offset of each file's first byte
    lengths: tuple[int, ...]  # bytes taken from each file: its listed size, less where max_bytes cuts
    n_bytes: int

    @property
    def n_files(self) -> int:
        """Files that contribute to the stream (a file cut to its separator alone counts)."""
        return len(self.paths)


def plan_stream(paths: Sequence[Path], max_bytes: int | None = None) -> StreamPlan:
    """Lay the files out in one stream from their current sizes, stopping at max_bytes."""
    sizes = [p.stat().st_size for p in paths]
    cap = sum(sizes) + max(len(paths) - 1, 0)
    if max_bytes is not None:
        cap = min(cap, max_bytes)
    starts, lengths, pos = [], [], 0
    for i, size in enumerate(sizes):
        if pos >= cap:
            break
        pos += 1 if i else 0
        starts.append(pos)
        lengths.append(min(size, cap - pos))
        pos += lengths[-1]
    return StreamPlan(tuple(map(os.fspath, paths[:len(starts)])), tuple(starts), tuple(lengths), pos)


def _read_into(path: str, offset: int, view: memoryview) -> None:
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        got = 0
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                raise ValueError(f"sources: {path} is shorter than when it was listed "
                                 f"(ends at byte {offset + got}); it changed while being read")
            got += n


def read_stream(plan: StreamPlan, start: int = 0, stop: int | None = None,
                on_read: Callable[[int], None] | None = None) -> np.ndarray:
    """Bytes [start, stop) of the planned stream; on_read(n) is called as each file's part lands.

    A file that grew since it was planned is cut at its planned length; one that shrank raises
    ValueError, so every read of one plan gives the same bytes or fails.
    """
    stop = plan.n_bytes if stop is None else stop
    if not 0 <= start <= stop <= plan.n_bytes:
        raise ValueError(f"span [{start}, {stop}) must lie in the stream [0, {plan.n_bytes}]")
    out = np.empty(stop - start, dtype=np.uint8)
    view = memoryview(out)
    ends = [s + n for s, n in zip(plan.starts, plan.lengths)]
    # File i owns [ends[i - 1], ends[i]): its separator (i > 0), then its bytes.
    i = bisect.bisect_right(ends, start)
    while i < plan.n_files and (first := plan.starts[i] - (1 if i else 0)) < stop:
        if i and first >= start:
            out[first - start] = 0x0A
        lo, hi = max(plan.starts[i], start), min(ends[i], stop)
        if hi > lo:
            _read_into(plan.paths[i], lo - plan.starts[i], view[lo - start:hi - start])
        if on_read is not None:
            on_read(min(ends[i], stop) - max(first, start))
        i += 1
    return out
