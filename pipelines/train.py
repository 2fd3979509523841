"""Distributed training on Ray Train, tracked in MLflow.

Ray's own split: `train_fn_per_worker` runs on every worker (builds the model, applies the
strategy from bitlm.parallel, reads its shard of the prepared Parquet corpus and runs
bitlm.engine.fit); `train_driver(cfg)` runs one training run (a TorchTrainer) and logs the final
model. `python -m pipelines.train --config FILE --set k=v` is the `ray job submit` entry point.

Data: every worker opens the corpus directory itself (a memory-mapped Parquet reader) and draws
its own rows (window r, r + world_size, ... for DDP/FSDP; the same batch on every rank for a
pipeline). Batches are step-deterministic, so a restarted worker resumes the exact data order
without any reader state; Ray Data would add a streaming executor and an object-store hop per
batch for data that is already laid out as fixed windows (see BENCHMARKS.md, Ray Train overhead).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import click

from bitlm.config import ExperimentConfig, apply_overrides, flatten, from_dict, to_dict, to_json
from bitlm.fields import check
from bitlm.evaluation import format_telemetry

FAILURE_MARKER = "injected-failure"  # written next to the run once fail_at_step has fired


@dataclass(frozen=True, kw_only=True)
class RayRunConfig:
    """Where a run executes: workers, devices, storage, tracking (how the ranks share the model: `parallel`)."""

    name: str = "bitlm"  # Ray Train run name; the same name and storage path resume a stopped run
    experiment: str = "bitlm"  # MLflow experiment
    storage_path: str = "runs/ray"  # made absolute (Ray Train's controller needs that)
    data: str = ""  # corpus directory written by `bitlm prepare` / pipelines.prepare
    verify_data: bool = True  # the driver checks every shard's sha256 against the manifest before training
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0  # worker/node failures survived by restarting from the latest checkpoint
    tracking: bool = True  # MLflow run per training run (rank 0 logs)
    register_model: Optional[str] = None  # registered model name for the final model
    model_alias: Optional[str] = None  # alias set on that registered version, e.g. "candidate"
    fail_at_step: int = 0  # drill: the last rank raises once at this step (0: never)

    def __post_init__(self) -> None:
        check(bool(self.name) and "/" not in self.name, "run.name", f"must be a non-empty name, got {self.name!r}")
        check(self.num_workers >= 1, "run.num_workers", f"must be >= 1, got {self.num_workers}")
        check(self.cpus_per_worker > 0, "run.cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        check(self.max_failures >= -1, "run.max_failures", f"must be >= -1 (-1: unlimited), got {self.max_failures}")
        check(self.fail_at_step >= 0, "run.fail_at_step", f"must be >= 0, got {self.fail_at_step}")
        check(self.model_alias is None or self.register_model is not None, "run.model_alias",
               "needs run.register_model (an alias names a version of a registered model)")


@dataclass(frozen=True, kw_only=True)
class PipelineConfig(ExperimentConfig):
    """An ExperimentConfig plus the `run` section of a Ray Train run."""

    run: RayRunConfig = field(default_factory=RayRunConfig)


def load_config(path: Optional[str | Path], sets: tuple[str, ...] | list[str] = ()) -> PipelineConfig:
    """A PipelineConfig from a JSON file (sections model/train/diffusion/scaling/parallel/run), then --set overrides."""
    cfg = from_dict(PipelineConfig, json.loads(Path(path).read_text())) if path else PipelineConfig()
    return apply_overrides(cfg, list(sets))


def run_directory(cfg: PipelineConfig) -> Path:
    return Path(cfg.run.storage_path).resolve() / cfg.run.name


# ----------------------------------------------------------------------------------------------
# on every worker


class RayReporter:
    """engine.fit's report callback: ray.train.report on every rank, MLflow on rank 0.

    Ray's report is a barrier across workers, so it is called on evaluations, scaling events and
    checkpoints only (every rank sees the same sequence of those); per-step training metrics go to
    MLflow alone.
    """

    def __init__(self, rank: int, world_size: int, tracker=None, fail_at_step: int = 0,
                 failure_marker: Optional[Path] = None):
        self.rank, self.world_size = rank, world_size
        self.tracker = tracker
        self.fail_at_step = fail_at_step
        self.failure_marker = failure_marker
        self.last_eval: dict[str, Any] = {}  # repeated with each checkpoint, so Result.metrics has the scores

    def __call__(self, metrics: dict[str, Any], checkpoint: Optional[Path]) -> None:
        import ray.train

        step = int(metrics.get("step", 0))
        if self.tracker is not None:
            if metrics.get("event") == "expand":
                self.tracker.log_event(metrics["scaling/kind"], step, **{
                    k: v for k, v in metrics.items() if k not in ("event", "scaling/kind", "step")})
            self.tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step)
        is_eval = any(k.startswith("val/") for k in metrics)
        if is_eval:
            self.last_eval = dict(metrics)
            if self.rank == 0:  # reaches the driver's console through Ray's log forwarding
                score = "val/bpb" if "val/bpb" in metrics else "val/elbo_bpb"
                # not print(): Ray Train patches it to tee into a logger as well, so every line came twice
                sys.stdout.write(f"step {step}: {score} {metrics[score]:.4f}  {format_telemetry(metrics)}\n")
                sys.stdout.flush()
        if checkpoint is not None or is_eval or metrics.get("event") or "final" in metrics:
            merged = (self.last_eval | metrics) if checkpoint is not None else metrics
            reportable = {k: v for k, v in merged.items() if isinstance(v, (int, float, str))}
            ckpt = ray.train.Checkpoint.from_directory(str(checkpoint)) if checkpoint is not None else None
            ray.train.report(reportable, checkpoint=ckpt, checkpoint_dir_name=checkpoint.name if checkpoint else None)
        self._maybe_fail(step)

    def _maybe_fail(self, step: int) -> None:
        """Failure drill: the last rank dies once at fail_at_step (the marker keeps restarts from dying again)."""
        if not self.fail_at_step or step != self.fail_at_step or self.rank != self.world_size - 1:
            return
        if self.failure_marker is None or self.failure_marker.exists():
            return
        self.failure_marker.parent.mkdir(parents=True, exist_ok=True)
        self.failure_marker.write_text(f"worker {self.rank} failed on purpose at step {step}\n")
        raise RuntimeError(f"injected failure at step {step} (run.fail_at_step)")


def quiet_report_log() -> None:
    """Silence Ray Train's INFO line per ray.train.report (it dumps every metric to the console).

    Its logger is named by the module's file path, not its dotted name, so RunConfig's
    LoggingConfig(log_level="WARNING") for "ray.train" does not reach it (Ray 2.60).
    """
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: nothing to silence
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: build, wrap and train the model; resume from Ray's latest checkpoint."""
    import ray.train
    import ray.train.torch
    import torch

    from bitlm.data import Corpus
    from bitlm.engine import fit
    from bitlm.model import BitTransformerLM
    from bitlm.parallel import strategy_for

    quiet_report_log()
    cfg = from_dict(PipelineConfig, config["cfg"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    strategy = strategy_for(cfg.parallel, rank=rank, world_size=world_size)
    _record_placement(Path(config["run_dir"]), rank, str(device))
    corpus = Corpus.open(cfg.run.data, verify=False)  # the driver checked the shards (run.verify_data)
    torch.manual_seed(cfg.train.seed)  # every rank builds the same initial weights
    model = BitTransformerLM(cfg.model)

    tracker = None
    if rank == 0 and config.get("mlflow_run_id"):
        from .tracking import RunTracker

        tracker = RunTracker.start(cfg.run.experiment, cfg.run.name, {}, run_id=config["mlflow_run_id"],
                                   uri=config["tracking_uri"])
    reporter = RayReporter(rank, world_size, tracker, cfg.run.fail_at_step,
                           Path(config["run_dir"]) / FAILURE_MARKER)
    restored = ray.train.get_checkpoint()
    with tempfile.TemporaryDirectory(prefix="bitlm-ckpt-") as local:
        resume_dir = None
        if restored is not None:
            resume_dir = Path(restored.to_directory(str(Path(local) / "restored")))
        try:
            fit(model, corpus, cfg, report=reporter, checkpoint_dir=Path(local) / "checkpoints",
                resume_from=resume_dir, device=device, strategy=strategy)
        finally:
            if tracker is not None:
                tracker.detach()


def _record_placement(run_dir: Path, rank: int, device: str) -> None:
    """Write <run dir>/workers/rank-N.json: the node, host, process and device of each rank (latest attempt)."""
    import socket

    import ray
    import torch

    record = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
              "pid": os.getpid(), "device": device, "torch_threads": torch.get_num_threads()}
    directory = run_dir / "workers"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"rank-{rank}.json").write_text(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------
# on the driver


def _mlflow_run_id(cfg: PipelineConfig, run_dir: Path, uri: str) -> Optional[str]:
    """The MLflow run of this training run: created once, reused when the driver resumes the run."""
    if not cfg.run.tracking:
        return None
    from .tracking import RunTracker

    id_file = run_dir / "mlflow_run_id"
    if id_file.exists():
        return id_file.read_text().strip()
    params = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in flatten(cfg).items()}
    tracker = RunTracker.start(cfg.run.experiment, cfg.run.name, params, system_metrics=False, uri=uri,
                               tags={"bitlm.strategy": cfg.parallel.strategy, "bitlm.arch": cfg.model.arch})
    run_dir.mkdir(parents=True, exist_ok=True)
    id_file.write_text(tracker.run_id)
    return tracker.run_id


def train_driver(cfg: PipelineConfig, *, callbacks: tuple = (), mlflow_run_id: Optional[str] = None):
    """Run one training run on the connected Ray cluster; returns the ray.train.Result.

    The final model is logged to MLflow as a pyfunc model whose artifact is its save_pretrained
    directory (and registered when run.register_model is set); <run dir>/model holds a copy.
    `callbacks` go to Ray Train's RunConfig (a Tune trial passes its TuneReportCallback);
    `mlflow_run_id` names an existing MLflow run to log into (a Tune trial's child run).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.config import LoggingConfig

    from .tracking import tracking_uri

    if not cfg.run.data:
        raise ValueError("run.data: the corpus directory is required (write one with `bitlm prepare`)")
    if not (Path(cfg.run.data) / "manifest.json").exists():
        raise ValueError(f"run.data: {cfg.run.data} holds no manifest.json (write it with `bitlm prepare`)")
    data = str(Path(cfg.run.data).resolve())
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, data=data))
    run_dir = run_directory(cfg)
    _check_data(cfg, run_dir)
    # the whole experiment beside <run>/model, as --local writes it: `bitlm generate --safe` and
    # `bitlm serve` read their gate settings from its safety section
    (run_dir / "config.json").write_text(to_json(cfg))
    # MLFLOW_TRACKING_URI, else the MLflow server of a running `bitlm cluster up --local`, else sqlite in cwd
    uri = os.environ.get("MLFLOW_TRACKING_URI") or _recorded("mlflow") or tracking_uri()
    run_id = mlflow_run_id if mlflow_run_id and cfg.run.tracking else _mlflow_run_id(cfg, run_dir, uri)
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "mlflow_run_id": run_id, "tracking_uri": uri,
                           "run_dir": str(run_dir)},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
                                               resources_per_worker={"CPU": cfg.run.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if cfg.run.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=str(run_dir.parent), callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=max(cfg.train.n_checkpoints_kept, 1)),
            logging_config=LoggingConfig(log_level="WARNING")),  # our reporter prints the evaluations
    )
    try:
        result = trainer.fit()
    except Exception:
        _finish_tracking(uri, run_id, "FAILED")
        raise
    model_dir = export_model(result, run_dir / "model")
    _finish_tracking(uri, run_id, "FINISHED", cfg, result, model_dir)
    return result


def _check_data(cfg: PipelineConfig, run_dir: Path) -> None:
    """Before Ray Train starts: the shards match the manifest, and a run being resumed had this corpus."""
    from bitlm.data import corpus_identity, read_manifest, verify_shards
    from bitlm.rundir import prepare_run_directory

    try:
        manifest = read_manifest(cfg.run.data)
        if cfg.run.verify_data:
            verify_shards(cfg.run.data, manifest)
    except FileNotFoundError as err:
        raise ValueError(str(err)) from None
    prepare_run_directory(run_dir, cfg.run.data, fresh=False, corpus=corpus_identity(manifest))


def export_model(result, target: Path) -> Optional[Path]:
    """Copy the weights and config of the final checkpoint into a save_pretrained directory."""
    if result.checkpoint is None:
        return None
    from bitlm.checkpoint import atomic_directory

    with result.checkpoint.as_directory() as source, atomic_directory(target) as tmp:
        for name in ("config.json", "model.safetensors"):
            shutil.copy2(Path(source) / name, tmp / name)
    return target


def _finish_tracking(uri: str, run_id: Optional[str], status: str, cfg: Optional[PipelineConfig] = None, result=None,
                     model_dir: Optional[Path] = None) -> None:
    if run_id is None:
        return
    from .tracking import RunTracker

    tracker = RunTracker.start("", "", {}, run_id=run_id, system_metrics=False, uri=uri)
    if result is not None:
        final = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
        tracker.log_dict(final, "metrics.json")
        if model_dir is not None:
            tracker.log_model(model_dir, registered_name=cfg.run.register_model, alias=cfg.run.model_alias)
    tracker.end(status)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="PipelineConfig JSON: sections model, train, diffusion, scaling, run (see pipelines/configs/).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a field by dotted key, e.g. --set run.num_workers=4 --set train.lr=1e-3. Repeatable.")
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a new local Ray).")
def main(config_file, sets, address):
    """Train on Ray Train with MLflow tracking (use with `ray job submit --working-dir . -- python -m pipelines.train`)."""
    try:
        cfg = load_config(config_file, sets)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    from ray.train import TrainingFailedError

    from bitlm.cli import console

    console.quiet()  # a job's log shows our lines, as `bitlm train` does
    try:
        result = run_training(cfg, address=address)
    except TrainingFailedError as err:
        raise click.ClickException(failure_text(err)) from None
    click.echo(summary(result))


def run_training(cfg: PipelineConfig, *, address: Optional[str] = None):
    """Connect to (or start) Ray and run train_driver."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        address = ray_address(address)
        # Ray Train's controller watches its workers through the dashboard's state API, so a local
        # Ray keeps the dashboard, bound to loopback
        ray.init(address=address, log_to_driver=True,
                 **({"dashboard_host": "127.0.0.1"} if address == "local" else {}))
    return train_driver(cfg)


def ray_address(address: Optional[str]) -> str:
    """The cluster to join: `address`, else RAY_ADDRESS, else the running `bitlm cluster up --local` head,
    else "local" (a new local Ray, never another one found)."""
    return address or os.environ.get("RAY_ADDRESS") or _recorded("ray") or "local"


def _recorded(key: str) -> Optional[str]:
    """An address ("ray", "mlflow") of the running `bitlm cluster up --local`, if there is one."""
    from cluster.state import recorded_addresses

    return recorded_addresses().get(key)


def failure_text(error: BaseException) -> str:
    """One line saying why a Ray Train run failed: the workers' own error where there is one.

    Ray wraps a worker's exception (WorkerGroupError -> RayTaskError -> the exception) and prints
    pages of actor metadata around it; our errors (a non-finite loss, a damaged checkpoint) already
    name the step or the file.
    """
    failures = getattr(error, "worker_failures", None) or {}
    for rank, failure in sorted(failures.items()):
        cause = _root_cause(failure)
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        return f"training failed on worker {rank}: {first}"
    cause = _root_cause(getattr(error, "controller_failure", None) or error)
    text = str(cause).strip().splitlines()
    return f"training failed: {text[0] if text else type(cause).__name__}"


def _root_cause(error: BaseException) -> BaseException:
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "cause", None) or error.__cause__
        if not isinstance(inner, BaseException):
            break
        error = inner
    return error


def summary(result) -> str:
    metrics = result.metrics or {}
    score = (f"val bpb {metrics['val/bpb']:.4f}" if "val/bpb" in metrics else
             f"val ELBO bpb {metrics['val/elbo_bpb']:.4f} (upper bound)" if "val/elbo_bpb" in metrics else "no eval")
    where = result.checkpoint.path if result.checkpoint is not None else "no checkpoint"
    return f"done: step {metrics.get('step', '?')}; {score}; checkpoint {where}"


if __name__ == "__main__":
    # run the importable module's main, not this __main__ copy: Ray pickles the worker function by
    # reference only when it lives in an importable module, and the configs' type hints resolve there
    from pipelines.train import main as importable_main

    importable_main()
