"""Corpus preparation as a Ray job: the byte stream read in parallel spans, written as `bitlm prepare` writes it.

    python -m pipelines.prepare SOURCES... --out DIR [options of bitlm prepare] [--address ADDR]
    ray job submit --working-dir . -- python -m pipelines.prepare SOURCES... --out /abs/DIR

The driver lists the files and lays out the stream exactly as `bitlm.data.prepare_corpus` does
(`bitlm.corpus_sources.plan_stream`), cuts it into spans of --task-bytes and has one Ray task read each
span with the same reader (`bitlm.corpus_sources.read_stream`) and count its bytes. The driver copies
each span into place, adds up the byte counts of the train part and hands the stream to the same
shard and manifest writer (`bitlm.data.write_corpus`), so shards and manifest are byte-identical.
Every node must see the source files under the driver's paths; only the driver writes --out.
"""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path
from typing import Sequence

import click
import numpy as np
import ray
from tqdm import tqdm

from bitlm.cli.prepare import corpus_options, prepared_summary
from bitlm.data import byte_histogram, check_prepare_args, split_sizes, write_corpus
from bitlm.corpus_sources import DEFAULT_INCLUDE, StreamPlan, plan_stream, read_stream, resolve_sources

DEFAULT_TASK_BYTES = 4 << 20
IN_FLIGHT_BYTES = 64 << 20


@ray.remote
def read_span(plan: StreamPlan, start: int, stop: int, train_stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Bytes [start, stop) of the planned stream and the byte histogram of those before train_stop."""
    data = read_stream(plan, start, stop)
    return data, byte_histogram(data[:max(0, min(stop, train_stop) - start)])


def _check_task_args(task_bytes: int, num_cpus_per_task: float) -> None:
    if isinstance(task_bytes, bool) or not isinstance(task_bytes, (int, np.integer)) or task_bytes < 1:
        raise ValueError(f"task_bytes must be an integer >= 1, got {task_bytes!r}")
    if isinstance(num_cpus_per_task, bool) or not isinstance(num_cpus_per_task, (int, float)) \
            or not num_cpus_per_task > 0:
        raise ValueError(f"num_cpus_per_task must be a number > 0, got {num_cpus_per_task!r}")


def prepare_driver(sources: Sequence[str | os.PathLike] | None, out_dir: str | Path, *,
                   window_bytes: int = 1024, val_fraction: float = 0.1, shard_windows: int = 8192,
                   max_bytes: int | None = None, include: tuple[str, ...] = DEFAULT_INCLUDE,
                   task_bytes: int = DEFAULT_TASK_BYTES, num_cpus_per_task: float = 1.0,
                   progress: bool = True) -> dict:
    """prepare_corpus with the reading done by Ray tasks over spans of the stream; needs ray.init() first."""
    check_prepare_args(window_bytes, val_fraction, shard_windows, max_bytes)
    _check_task_args(task_bytes, num_cpus_per_task)
    if not ray.is_initialized():
        raise RuntimeError("prepare_driver runs inside a Ray session: call ray.init() first")
    given, paths = resolve_sources(sources, include)
    plan = plan_stream(paths, max_bytes)
    # Raises on a corpus too small for one window before any task starts.
    (n_train_windows, _), _ = split_sizes(plan.n_bytes, window_bytes, val_fraction).values()
    train_stop = n_train_windows * window_bytes

    spans = deque((start, min(start + task_bytes, plan.n_bytes))
                  for start in range(0, plan.n_bytes, task_bytes))
    # At least two spans per task slot keep the workers busy while the driver copies; small spans
    # get more, up to 64 MiB waiting in the object store, to hide each task's ~1 ms of scheduling.
    slots = max(1, int(ray.cluster_resources().get("CPU", 1) / num_cpus_per_task))
    max_in_flight = max(2 * slots, IN_FLIGHT_BYTES // task_bytes)
    plan_ref = ray.put(plan)
    task = read_span.options(num_cpus=num_cpus_per_task)
    stream = np.empty(plan.n_bytes, dtype=np.uint8)
    train_histogram = np.zeros(256, dtype=np.int64)
    pending: dict[ray.ObjectRef, int] = {}
    with tqdm(total=plan.n_bytes, unit="B", unit_scale=True, disable=not progress,
              desc=f"reading ({len(spans)} tasks)") as bar:
        while spans or pending:
            while spans and len(pending) < max_in_flight:
                start, stop = spans.popleft()
                pending[task.remote(plan_ref, start, stop, train_stop)] = start
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            start = pending.pop(ref)
            data, hist = ray.get(ref)
            # Spans land in any order; each has its fixed place in the stream.
            stream[start:start + len(data)] = data
            train_histogram += hist
            bar.update(len(data))
            del data, ref
    return write_corpus(stream, out_dir, sources=given, n_files=plan.n_files, window_bytes=window_bytes,
                        val_fraction=val_fraction, shard_windows=shard_windows,
                        train_histogram=train_histogram)


@click.command("prepare")
@corpus_options
@click.option("--task-bytes", default=DEFAULT_TASK_BYTES, show_default=True,
              help="Bytes of the stream each Ray task reads (>= 1).")
@click.option("--num-cpus-per-task", default=1.0, show_default=True, help="CPUs reserved per read task (> 0).")
@click.option("--address", default=None,
              help="Ray cluster to join; default $RAY_ADDRESS, else a new local Ray.")
def main(sources, out_dir, window_bytes, val_fraction, max_bytes, shard_windows, task_bytes,
         num_cpus_per_task, address, quiet):
    """Turn SOURCES (files, directories, globs) into a training corpus, reading them with Ray tasks.

    Same inputs, defaults and output as `bitlm prepare`: with no SOURCES the running Python's
    standard-library sources; files concatenated in sorted order; {train,val}-NNNNN.parquet and
    manifest.json written into --out, byte-identical to what `bitlm prepare` writes.
    """
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            # "local" never attaches to a `ray start` instance that happens to run on this machine.
            ray.init(address="local", include_dashboard=False)
    try:
        manifest = prepare_driver(list(sources) or None, out_dir, window_bytes=window_bytes,
                                  val_fraction=val_fraction, shard_windows=shard_windows,
                                  max_bytes=max_bytes, task_bytes=task_bytes,
                                  num_cpus_per_task=num_cpus_per_task, progress=not quiet)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    finally:
        if started:
            ray.shutdown()
    click.echo(prepared_summary(manifest, Path(out_dir).resolve()))


if __name__ == "__main__":
    main()
