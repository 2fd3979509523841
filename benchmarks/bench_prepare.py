"""Corpus preparation time: bitlm.data.prepare_corpus (one process) vs pipelines.prepare.prepare_driver (Ray tasks).

Run from benchmarks/: ``python bench_prepare.py [--max-bytes N] [--task-bytes N ...] [--repeats R] [--out PATH]``.
Both read the default corpus of `bitlm prepare` (this Python's standard-library sources) cut at
--max-bytes, with the page cache warmed by an untimed first run. The Ray side runs on a local Ray
with one CPU per core; Ray's start-up and the first call (worker processes starting) are reported
apart from the best of --repeats. Each Ray output is checked to equal the single-process one.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bitlm.data import prepare_corpus
from common import best_seconds, emit


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-bytes", type=int, default=20_000_000, help="stream bytes (default 20,000,000)")
    parser.add_argument("--task-bytes", type=int, nargs="+", default=[16 << 10, 1 << 20, 4 << 20],
                        help="Ray span sizes to time (default 16 KiB, about one stdlib file; 1 MiB; 4 MiB)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is reported (default 3)")
    parser.add_argument("--out", type=Path, help="append the results to this file as JSON lines")
    args = parser.parse_args(argv)
    if args.max_bytes < 1 or args.repeats < 1 or min(args.task_bytes) < 1:
        parser.error("--max-bytes, --repeats and --task-bytes must be >= 1")

    options = dict(window_bytes=1024, val_fraction=0.1, shard_windows=8192, max_bytes=args.max_bytes, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        expected = prepare_corpus(None, Path(tmp) / "single", **options)  # warms the page cache
        common = {"bench": "prepare", "n_bytes": expected["n_bytes_total"], "n_files": expected["n_files"],
                  "repeats": args.repeats}
        seconds = best_seconds(lambda: prepare_corpus(None, Path(tmp) / "single", **options), args.repeats)
        emit({**common, "impl": "prepare_corpus", "seconds": round(seconds, 3),
              "mb_per_s": round(expected["n_bytes_total"] / seconds / 1e6, 1)}, args.out)

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        from pipelines.prepare import prepare_driver

        start = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray_init_s = time.perf_counter() - start
        try:
            for task_bytes in args.task_bytes:
                run = lambda: prepare_driver(None, Path(tmp) / "ray", task_bytes=task_bytes, **options)  # noqa: E731
                start = time.perf_counter()
                if run() != expected:
                    raise RuntimeError(f"prepare_driver (task_bytes={task_bytes}) wrote a different manifest")
                first_s = time.perf_counter() - start
                seconds = best_seconds(run, args.repeats)
                emit({**common, "impl": "prepare_driver", "task_bytes": task_bytes,
                      "n_tasks": -(-expected["n_bytes_total"] // task_bytes), "ray_cpus": os.cpu_count(),
                      "seconds": round(seconds, 3), "first_s": round(first_s, 3),
                      "ray_init_s": round(ray_init_s, 2),
                      "mb_per_s": round(expected["n_bytes_total"] / seconds / 1e6, 1)}, args.out)
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
