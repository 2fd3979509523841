"""Distillation on Ray Train, tracked in MLflow: each round of bitlm.distill.collapse_submodel is a TorchTrainer run.

The driver loads the teacher (a local or checkpoint directory, `runs:/...` or `models:/name@alias`,
resolved by serve.model_sources), picks the windows (TelemetrySynthesizer), and runs collapse_submodel
with a round function that trains the student on Ray Train: the workers, strategies (ddp, fsdp)
and FailureConfig of pipelines.train. The driver measures each round and decides whether to deepen
or widen. The student goes to MLflow as the pyfunc model in its own run, linked to the teacher by
the tags bitlm.teacher (the source) and bitlm.teacher_run_id (when the teacher came from MLflow),
with metrics.json as an artifact, and is registered with alias `distilled` when a name is given.
`python -m pipelines.distill TEACHER --data DIR ...` (the options of `bitlm distill`) is the
`ray job submit` entry point.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from bitlm.config import ModelConfig, ParallelConfig, TrainConfig, from_dict, to_dict
from bitlm.distill import DistillConfig

from .train import PipelineConfig, RayRunConfig, RayReporter, export_model, quiet_report_log, run_directory

ALIAS = "distilled"


@dataclass(frozen=True, kw_only=True)
class DistillJob:
    """One distillation: teacher, data, student, floors, where the student goes, how the rounds run."""

    teacher: str  # the source as given (a path, runs:/..., models:/...)
    teacher_dir: str  # the resolved save_pretrained directory
    student: ModelConfig
    floors: dict[str, float]
    out: str
    register: Optional[str] = None
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # ddp or fsdp
    run: RayRunConfig = field(default_factory=RayRunConfig)


def teacher_run_id(source: str, teacher_dir: Path) -> Optional[str]:
    """The MLflow run that logged the teacher: from a runs:/ URI, or the MLmodel file of a models:/ download."""
    if match := re.match(r"^runs:/([0-9a-f]+)/", source):
        return match.group(1)
    if not source.startswith("models:/"):
        return None
    for parent in list(teacher_dir.parents)[:4]:
        mlmodel = parent / "MLmodel"
        if mlmodel.is_file():
            found = re.search(r"^run_id:\s*(\S+)\s*$", mlmodel.read_text(), flags=re.MULTILINE)
            return found.group(1) if found else None
    return None


# ----------------------------------------------------------------------------------------------
# on every worker


def distill_fn_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker of one round: the student from the round's start, the teacher, fit with the KL loss."""
    import numpy as np
    import ray.train
    import ray.train.torch

    from bitlm.checkpoint import from_pretrained
    from bitlm.data import ByteWindows, Corpus
    from bitlm.distill import distillation_batch_loss, load_model
    from bitlm.engine import fit
    from bitlm.parallel import strategy_for

    quiet_report_log()
    cfg = from_dict(PipelineConfig, config["cfg"])
    distill = from_dict(DistillConfig, config["distill"], "distill.")
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    strategy = strategy_for(cfg.parallel, rank=rank, world_size=world_size)
    full = Corpus.open(cfg.run.data, verify=False)  # the driver checked the shards
    corpus = Corpus(ByteWindows(np.asarray(config["windows"], dtype=np.uint8)), full.val, full.manifest, full.directory)
    student = load_model(config["init"])
    teacher = from_pretrained(config["teacher"], device=device).eval()

    def loss(net, batch):
        return distillation_batch_loss(net, batch, teacher=teacher, temperature=distill.temperature,
                                 kl_weight=distill.kl_weight, data_weight=distill.data_weight)

    tracker = None
    if rank == 0 and config.get("mlflow_run_id"):
        from .tracking import RunTracker

        tracker = RunTracker.start("", "", {}, run_id=config["mlflow_run_id"], uri=config["tracking_uri"],
                                   system_metrics=False)
    reporter = RayReporter(rank, world_size, tracker)
    offset, round_number = config["step_offset"], config["round"]

    def report(metrics, checkpoint):  # rounds follow each other on one MLflow step axis
        reporter({**metrics, "step": int(metrics.get("step", 0)) + offset, "distill/round": round_number}, checkpoint)

    restored = ray.train.get_checkpoint()
    with tempfile.TemporaryDirectory(prefix="bitlm-distill-") as local:
        resume_dir = Path(restored.to_directory(str(Path(local) / "restored"))) if restored is not None else None
        try:
            fit(student, corpus, cfg, report=report, checkpoint_dir=Path(local) / "checkpoints",
                resume_from=resume_dir, device=device, strategy=strategy, loss=loss)
        finally:
            if tracker is not None:
                tracker.detach()


# ----------------------------------------------------------------------------------------------
# on the driver


def ray_round(job: DistillJob, run_dir: Path, run_id: Optional[str], uri: str) -> Callable:
    """collapse_submodel's train_round: one TorchTrainer run per round; returns the trained student."""
    def train(student, corpus, train_cfg, index):
        import ray.train
        from ray.train.torch import TorchConfig, TorchTrainer
        from ray.train.v2.api.config import LoggingConfig

        from bitlm.distill import load_model, save_model

        round_dir = run_dir / f"round-{index + 1}"
        init = save_model(student, round_dir / "init")
        run = dataclasses.replace(job.run, name=f"{job.run.name}-round-{index + 1}", storage_path=str(round_dir))
        cfg = PipelineConfig(model=student.config, train=train_cfg, parallel=job.parallel, run=run)
        trainer = TorchTrainer(
            distill_fn_per_worker,
            train_loop_config={"cfg": to_dict(cfg), "distill": to_dict(job.distill), "init": str(init),
                               "teacher": job.teacher_dir, "windows": corpus.train.to_numpy(),
                               "mlflow_run_id": run_id, "tracking_uri": uri, "round": index + 1,
                               "step_offset": index * train_cfg.max_steps},
            scaling_config=ray.train.ScalingConfig(num_workers=run.num_workers, use_gpu=run.use_gpu,
                                                   resources_per_worker={"CPU": run.cpus_per_worker}),
            torch_config=TorchConfig(backend="nccl" if run.use_gpu else "gloo"),
            run_config=ray.train.RunConfig(
                name=run.name, storage_path=str(round_dir), failure_config=ray.train.FailureConfig(
                    max_failures=run.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=max(train_cfg.n_checkpoints_kept, 1)),
                logging_config=LoggingConfig(log_level="WARNING")))
        result = trainer.fit()
        model_dir = export_model(result, round_dir / "model")
        if model_dir is None:
            raise RuntimeError(f"round {index + 1}: Ray Train returned no checkpoint")
        return load_model(model_dir, device=next(student.parameters()).device)
    return train


def run_distill(job: DistillJob, *, address: Optional[str] = None, report=None):
    """Distil on the connected (or a new local) Ray; returns (CollapseResult, metrics, out dir, model URI or None)."""
    import os

    import ray

    from bitlm.checkpoint import from_pretrained
    from bitlm.config import flatten
    from bitlm.data import Corpus, verify_shards
    from bitlm.distill import collapse_submodel, save_distilled_model

    from .tracking import RunTracker, tracking_uri
    from .train import ray_address

    if job.parallel.strategy == "pipeline":
        raise ValueError("parallel.strategy: distillation trains with ddp or fsdp (the pipeline strategy owns the "
                         "backward pass, and the distillation loss needs the whole model)")
    data = str(Path(job.run.data).resolve())
    if job.run.verify_data:
        verify_shards(data)
    job = dataclasses.replace(job, run=dataclasses.replace(job.run, data=data))
    corpus = Corpus.open(data, verify=False)
    teacher = from_pretrained(job.teacher_dir)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        where = ray_address(address)
        ray.init(address=where, log_to_driver=True, **({"dashboard_host": "127.0.0.1"} if where == "local" else {}))
    uri = tracking_uri()
    run_dir = run_directory(PipelineConfig(run=job.run))
    parent = teacher_run_id(job.teacher, Path(job.teacher_dir))
    tags = {"bitlm.teacher": job.teacher, "bitlm.kind": "distilled", "bitlm.arch": job.student.arch}
    if parent:
        tags["bitlm.teacher_run_id"] = parent
    params = flatten(job.student, "model.") | flatten(job.train, "train.") | flatten(job.run, "run.") | \
        flatten(job.distill, "distill.") | {f"floor.{k}": v for k, v in job.floors.items()}
    tracker = RunTracker.start(job.run.experiment, job.run.name, params, tags=tags, system_metrics=False, uri=uri)
    try:
        result = collapse_submodel(teacher, corpus, job.floors, student=job.student, config=job.distill,
                                   width_scale=job.distill.width_scale, train=job.train, device="cpu",
                                   report=report, train_round=ray_round(job, run_dir, tracker.run_id, uri))
        metrics = result.metrics()
        metrics["teacher"]["source"] = job.teacher
        out = save_distilled_model(result.student, job.out, metrics)
        tracker.log_metrics({f"student/{k}": v for k, v in result.achieved.items()} |
                            {f"teacher/{k}": v for k, v in result.teacher_metrics.items()} |
                            {"distill/n_rounds": len(result.rounds), "distill/met": float(result.met),
                             "student/n_parameters": metrics["student"]["n_parameters"]},
                            len(result.rounds) * job.train.max_steps)
        tracker.log_dict(metrics, "metrics.json")
        model_uri = tracker.log_model(out, registered_name=job.register, alias=ALIAS if job.register else None)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    return result, metrics, out, model_uri


def log_distilled(out: Path, metrics: dict[str, Any], *, teacher: str, teacher_dir: Path, experiment: str,
                  name: str, register: Optional[str]) -> str:
    """Log a distilled model made in this process (bitlm distill --local --register): run, metrics.json, pyfunc."""
    from .tracking import RunTracker

    parent = teacher_run_id(teacher, teacher_dir)
    tags = {"bitlm.teacher": teacher, "bitlm.kind": "distilled", **({"bitlm.teacher_run_id": parent} if parent else {})}
    with RunTracker.start(experiment, name, {f"floor.{k}": v for k, v in metrics["floors"].items()}, tags=tags,
                          system_metrics=False) as tracker:
        tracker.log_metrics({f"student/{k}": v for k, v in metrics["achieved"].items()}
                            | {"teacher/val_bpb": metrics["teacher"]["val_bpb"]}, 0)
        tracker.log_dict(metrics, "metrics.json")
        return tracker.log_model(out, registered_name=register, alias=ALIAS if register else None)


if __name__ == "__main__":
    # the options of `bitlm distill`, on Ray (without --local); run the importable module's command so
    # Ray pickles distill_fn_per_worker by reference
    from bitlm.cli import console
    from bitlm.cli.distill import distill_command

    console.quiet()
    distill_command()
