"""`bitlm distill`: collapse a teacher into a smaller student (in this process with --local, else on Ray Train)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from . import loading

DEFAULT_EXPERIMENT = "bitlm-distill"


def resolve_teacher(source: str, allowed_roots) -> Path:
    """The teacher's model directory (under the allowed roots, or runs:/ and models:/ downloads); one line if not."""
    from serve.model_sources import resolve_source

    try:
        return resolve_source(source, list(allowed_roots) or None)
    except ValueError as err:  # SourceError, CheckpointError
        raise click.BadParameter(str(err), param_hint="TEACHER") from None


def parse_student(value: str, teacher_config, context_bytes: int):
    """--student: a preset name of the teacher's kind, or a JSON file (ModelConfig fields, or a config with `model`)."""
    from ..config import ModelConfig, from_dict
    from ..distill import check_pair, student_config

    try:
        if Path(value).is_file():
            try:
                data = json.loads(Path(value).read_text())
            except (OSError, ValueError) as err:
                raise ValueError(f"{value}: not a readable JSON config ({err})") from None
            fields = data.get("model", data) if isinstance(data, dict) else data
            try:
                cfg = from_dict(ModelConfig, fields)
            except ValueError as err:
                raise ValueError(f"{value}: {err}") from None
            check_pair(teacher_config, cfg)
            return cfg
        return student_config(value, teacher_config, context_bytes)
    except ValueError as err:
        hint = "" if Path(value).is_file() or "preset" not in str(err) else " (or give a ModelConfig JSON file)"
        raise click.BadParameter(f"{err}{hint}", param_hint="--student") from None


def check_out(out: Path, data_dir: Path) -> Path:
    """--out must be new, empty, or an earlier distilled model (which is replaced); never the data or cwd."""
    from ..distill import METRICS_FILE

    resolved = out.resolve()
    if resolved in (Path.cwd().resolve(), data_dir.resolve()) or data_dir.resolve().is_relative_to(resolved):
        raise click.BadParameter(f"{out} is the working directory or holds the corpus; choose another directory",
                                 param_hint="--out")
    if out.exists() and any(out.iterdir()) and not ((out / "config.json").is_file() and (out / METRICS_FILE).is_file()):
        raise click.BadParameter(f"{out} holds files that are not a distilled model; choose a new or empty directory "
                                 "(an earlier distilled model there is replaced)", param_hint="--out")
    return out


@click.command("distill")
@click.argument("teacher")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Corpus directory written by `bitlm prepare`.")
@click.option("--student", default="tiny", show_default=True,
              help="Preset (tiny, small, base) of the teacher's kind and parity, or a JSON file of ModelConfig "
                   "fields (or a run's config.json: its model section).")
@click.option("--floors", "floors_text", default="c=0.3,s=0.5", show_default=True,
              help="Floors the student must meet: k (negentropy on held-out text), c and s (LZ complexity and "
                   "symbiosis of its generated samples), bpb (a ceiling on held-out bits per byte).")
@click.option("--local", is_flag=True, help="Distil in this process (no Ray); --register still logs to MLflow.")
@click.option("--out", "out_dir", default="runs/distilled", show_default=True, type=click.Path(file_okay=False),
              help="Where the student (save_pretrained layout + metrics.json) is written.")
@click.option("--register", default=None, help=f"Register the student under this MLflow name, alias "
                                               f"'distilled' (models:/NAME@distilled).")
@click.option("--selection", type=click.Choice(["cluster", "random", "all"]), default="cluster", show_default=True,
              help="Windows the student trains on: k-means representatives, as many random ones, or all.")
@click.option("--k", type=click.IntRange(min=1), default=8, show_default=True, help="Clusters.")
@click.option("--per-cluster", type=click.IntRange(min=1), default=4, show_default=True,
              help="Representatives per cluster.")
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True, help="Optimizer steps per round.")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), default=None, callback=loading.finite,
              help="Wall-clock budget per round (the LR schedule follows time).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--context-bytes", type=click.IntRange(min=2), default=None,
              help="Training context [the teacher's, at most the corpus window].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=3e-3, show_default=True,
              callback=loading.finite)
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              callback=loading.finite, help="Softmax temperature T of the KL term (scaled by T^2).")
@click.option("--kl-weight", type=click.FloatRange(min=0), default=0.5, show_default=True, callback=loading.finite)
@click.option("--data-weight", type=click.FloatRange(min=0), default=0.5, show_default=True, callback=loading.finite)
@click.option("--width-scale", type=click.FloatRange(min=1, min_open=True), default=1.5, show_default=True,
              callback=loading.finite, help="d_ff factor of the widening round.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
@click.option("--allowed-root", "allowed_roots", multiple=True, type=click.Path(file_okay=False),
              help="Directory a local TEACHER may resolve into; repeatable [default: BITLM_SERVE_ROOTS, else cwd].")
@click.option("--device", default=None, callback=loading.device, help="--local: torch device.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Ray: training workers.")
@click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--strategy", type=click.Choice(["ddp", "fsdp"]), default="ddp", show_default=True,
              help="parallel.strategy of the rounds (the pipeline strategy cannot run the distillation loss).")
@click.option("--max-failures", type=click.IntRange(min=-1), default=0, show_default=True,
              help="Ray: worker failures survived per round by restarting from its latest checkpoint.")
@click.option("--experiment", default=DEFAULT_EXPERIMENT, show_default=True, help="MLflow experiment.")
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a new local Ray).")
def distill_command(teacher, data_dir, student, floors_text, local, out_dir, register, selection, k, per_cluster,
                    steps, minutes, batch_size, context_bytes, lr, temperature, kl_weight, data_weight, width_scale,
                    seed, allowed_roots, device, workers, cpus_per_worker, strategy, max_failures, experiment,
                    address):
    """Distil TEACHER into a smaller student and check it against --floors.

    The student trains on the windows TelemetrySynthesizer picks (k-means over the teacher's pooled
    hidden states and K/C/S) with --data-weight x CE + --kl-weight x T^2 KL to the teacher; on missed floors it is
    deepened once, then widened once by --width-scale, and the result says which floors still
    fail. TEACHER is a model or run directory under an allowed root, runs:/<id>/model or
    models:/<name>@<alias>.
    """
    from ..config import TrainConfig
    from ..distill import DistillConfig, parse_floors
    from .corpus import open_corpus

    try:
        floors = parse_floors(floors_text)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--floors") from None
    data = Path(data_dir)
    out = check_out(Path(out_dir), data)
    corpus = open_corpus(data, verify=True)
    teacher_dir = resolve_teacher(teacher, allowed_roots)
    from ..checkpoint import from_pretrained, read_config
    from ..synthesizer import check_model_and_windows

    teacher_config = read_config(teacher_dir)
    teacher_bytes = teacher_config.max_input_ids // teacher_config.ids_per_byte
    context = min(context_bytes or teacher_bytes, teacher_bytes, corpus.train.window_bytes)
    if context_bytes is not None and context_bytes > context:
        raise click.BadParameter(f"{context_bytes} exceeds the teacher's context ({teacher_bytes} bytes) or the "
                                 f"corpus windows ({corpus.train.window_bytes} bytes)", param_hint="--context-bytes")
    student_cfg = parse_student(student, teacher_config, context)
    if k * per_cluster > corpus.train.n_windows and selection != "all":
        raise click.BadParameter(f"k={k} x per-cluster={per_cluster} exceeds the {corpus.train.n_windows} train "
                                 "windows of the corpus", param_hint="--k")
    try:
        config = DistillConfig(selection=selection, k=k, per_cluster=per_cluster, temperature=temperature,
                               kl_weight=kl_weight, data_weight=data_weight, width_scale=width_scale, seed=seed)
        train = TrainConfig(seed=seed, batch_size=batch_size, context_bytes=context, max_steps=steps if minutes is None
                            else 10_000_000, max_seconds=minutes * 60 if minutes else None, lr=lr,
                            warmup_steps=min(100, max(1, steps // 10)), eval_every_steps=max(1, steps // 4),
                            log_every_steps=max(1, min(25, steps // 4)), n_eval_batches=8)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    click.echo(f"teacher {teacher_dir}: {teacher_config.arch}/{teacher_config.representation}; student "
               f"d_model {student_cfg.d_model}, {student_cfg.n_layers} layers; floors {floors or 'none'}", err=True)
    if local:
        teacher_model = from_pretrained(teacher_dir, device=device or "cpu")
        try:
            check_model_and_windows(teacher_model, corpus.train, context)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="TEACHER") from None
        result, metrics = run_local(teacher_model, corpus, floors, student_cfg, config, train, device, teacher)
        from ..distill import save_distilled_model

        save_distilled_model(result.student, out, metrics)
        model_uri = None
        if register:
            from pipelines.distill import log_distilled

            model_uri = log_distilled(out, metrics, teacher=teacher, teacher_dir=teacher_dir, experiment=experiment,
                                      name=out.resolve().name, register=register)
    else:
        result, metrics, model_uri = run_on_ray(teacher, teacher_dir, student_cfg, floors, out, register, config, train,
                                                data, workers, cpus_per_worker, strategy, max_failures, experiment,
                                                address)
    click.echo(summary(metrics, out, register, model_uri))


def run_local(teacher_model, corpus, floors, student_cfg, config, train, device, source):
    from ..distill import collapse_submodel

    def report(metrics, _=None):
        if "val/bpb" in metrics:
            click.echo(f"round {metrics['distill/round'] + 1} step {int(metrics['step'])}: val bpb "
                       f"{metrics['val/bpb']:.4f}", err=True)

    try:
        result = collapse_submodel(teacher_model, corpus, floors, student=student_cfg, config=config, train=train,
                                   width_scale=config.width_scale, device=device, report=report)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    metrics = result.metrics()
    metrics["teacher"]["source"] = source
    return result, metrics


def run_on_ray(teacher, teacher_dir, student_cfg, floors, out, register, config, train, data, workers, cpus_per_worker,
               strategy, max_failures, experiment, address):
    from ray.train import TrainingFailedError

    from pipelines.distill import DistillJob, run_distill
    from bitlm.config import ParallelConfig
    from pipelines.train import RayRunConfig, failure_text

    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    run = RayRunConfig(name=out.resolve().name, experiment=experiment, storage_path=str(out.resolve().parent / ".ray"),
                       data=str(data), num_workers=workers, cpus_per_worker=cpus_per_worker,
                       max_failures=max_failures)
    job = DistillJob(teacher=teacher, teacher_dir=str(teacher_dir), student=student_cfg, floors=floors,
                     out=str(out), register=register, distill=config, train=train,
                     parallel=ParallelConfig(strategy=strategy), run=run)
    try:
        result, metrics, _, model_uri = run_distill(job, address=address)
    except TrainingFailedError as err:
        raise click.ClickException(failure_text(err)) from None
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    return result, metrics, model_uri


def summary(metrics, out: Path, register, model_uri) -> str:
    teacher, student = metrics["teacher"], metrics["student"]
    lines = [f"teacher val bpb {teacher['val_bpb']:.4f} ({teacher['n_parameters']:,} parameters); student val bpb "
             f"{student['val_bpb']:.4f} ({student['n_parameters']:,} parameters, "
             f"{metrics['parameter_ratio']:.0%} of the teacher) after {metrics['n_rounds']} round(s)",
             metrics["message"], f"saved to {out} (metrics.json beside the weights)"]
    if register:
        lines.append(f"registered: models:/{register}@distilled ({model_uri})")
    return "\n".join(lines)
