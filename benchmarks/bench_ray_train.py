"""Ray Train overhead and data-parallel throughput on this machine.

Throughput is wall-clock: bytes trained between the first and the last training-log record
divided by the seconds between them, so reporting, MLflow logging and Ray's barriers count.
The in-process run is engine.fit without Ray; the Ray runs go through pipelines.train.train_driver
(MLflow on a temporary SQLite store) and read their log records back from MLflow.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch
from mlflow.tracking import MlflowClient

from bitlm.config import ModelConfig, ParallelConfig, TrainConfig
from bitlm.data import Corpus, prepare_corpus
from bitlm.engine import fit
from bitlm.model import BitTransformerLM
from pipelines.train import PipelineConfig, RayRunConfig, train_driver

from common import SHAKESPEARE, emit


def wall_throughput(points: list[tuple[float, float]]) -> float:
    """(time s, bytes seen) pairs -> bytes/s from the first to the last, skipping the first record (warm-up)."""
    points = sorted(points)[1:]
    (t0, b0), (t1, b1) = points[0], points[-1]
    return (b1 - b0) / (t1 - t0)


def in_process(corpus_dir: Path, model_cfg: ModelConfig, train: TrainConfig, threads: int) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    points = []

    def report(metrics, _):
        if "bytes_per_s" in metrics:
            points.append((time.time(), metrics["bytes_seen"]))

    fit(BitTransformerLM(model_cfg), Corpus.open(corpus_dir), train, report=report)
    return wall_throughput(points)


def through_ray(corpus_dir: Path, model_cfg: ModelConfig, train: TrainConfig, storage: Path, uri: str,
                name: str, strategy: str = "ddp", **run) -> tuple[float, float]:
    cfg = PipelineConfig(model=model_cfg, train=train, parallel=ParallelConfig(strategy=strategy),
                         run=RayRunConfig(name=name, experiment="bench", storage_path=str(storage),
                                          data=str(corpus_dir), **run))
    start = time.perf_counter()
    train_driver(cfg)
    total = time.perf_counter() - start
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("bench")
    (mlflow_run,) = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    seen = client.get_metric_history(mlflow_run.info.run_id, "bytes_seen")
    by_step = {m.step: m for m in seen}
    # bytes_seen is logged at every log step (and with evaluations); keep one record per step
    points = [(m.timestamp / 1000.0, m.value) for m in by_step.values()]
    placement = json.loads((storage / name / "workers" / "rank-0.json").read_text())
    return wall_throughput(points), total, placement["torch_threads"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--kind", default="patched")
    parser.add_argument("--batch-size", type=int, default=16, help="per worker")
    parser.add_argument("--context-bytes", type=int, default=128)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--runs", default="single,ray1,ddp2,fsdp2")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the runs in alternation")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the in-process run "
                        "(Ray gives each worker as many as its CPUs; the records show both)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import os

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        tmp = Path(tmp)
        prepare_corpus([SHAKESPEARE], tmp / "data", window_bytes=1024, val_fraction=0.1)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        model_cfg = ModelConfig.from_name(args.preset, kind=args.kind)
        model_cfg = ModelConfig.from_name(args.preset, kind=args.kind,
                                          max_positions=args.context_bytes * model_cfg.positions_per_byte)
        train = TrainConfig(batch_size=args.batch_size, context_bytes=args.context_bytes, max_steps=args.steps,
                            log_every=args.log_every, eval_every=10 * args.steps, eval_batches=2, precision="fp32")
        base = {"bench": "ray_train", "preset": args.preset, "kind": args.kind, "batch_size": args.batch_size,
                "context_bytes": args.context_bytes, "steps": args.steps}
        rates: dict[str, list[float]] = {}
        runs = args.runs.split(",")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        plans = {"ray1": dict(num_workers=1, cpus_per_worker=float(args.threads), strategy="ddp"),
                 "ddp2": dict(num_workers=2, cpus_per_worker=1.0, strategy="ddp"),
                 "fsdp2": dict(num_workers=2, cpus_per_worker=1.0, strategy="fsdp")}
        # rounds alternate the runs, so a slow spell of the shared machine hits all of them alike
        for round_ in range(args.rounds):
            for name in runs:
                if name == "single":
                    rate, extra = in_process(tmp / "data", model_cfg, train, args.threads), {
                        "workers": 1, "worker_threads": args.threads}
                else:
                    rate, total, threads = through_ray(tmp / "data", model_cfg, train, tmp / "ray", uri,
                                                       f"{name}-{round_}", **plans[name])
                    extra = {"workers": plans[name]["num_workers"], "strategy": plans[name]["strategy"],
                             "fit_seconds_total": total, "worker_threads": threads}
                rates.setdefault(name, []).append(rate)
                record = base | extra | {"run": name, "round": round_, "bytes_per_s": rate}
                if "single" in rates and name != "single":
                    record["ratio_to_single"] = rate / rates["single"][-1]
                emit(record, args.out)
        ray.shutdown()
    for name, values in rates.items():
        ratios = [v / s for v, s in zip(values, rates.get("single", []))]
        print(f"{name}: bytes/s {[round(v) for v in values]}"
              + (f", ratio to single per round {[round(r, 3) for r in ratios]}, median "
                 f"{statistics.median(ratios):.3f}" if ratios and name != "single" else ""))

if __name__ == "__main__":
    main()
