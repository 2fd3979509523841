"""`bitlm train` (Ray Train, or --local in this process) and `bitlm demo`."""

from __future__ import annotations

import json
import os
import sys
import time
import typing
import warnings
from pathlib import Path

import click

from ..config import StrategyName
from . import loading
from .corpus import open_corpus

RAY_STRATEGIES = [s for s in typing.get_args(StrategyName) if s != "single"]  # a Ray run has 2+ workers
from .options import (DEFAULT_KIND, build_experiment, corpus_window, diffusion_options, diffusion_sets,
                      model_options)


def run_local_training(cfg, data_dir: Path, out: Path, *, resume: bool, device, progress: bool,
                       verify_data: bool = True):
    """Train per `cfg` on a prepared corpus; write config.json, metrics.jsonl, checkpoints/ and model/."""
    import torch

    from .. import checkpoint as ckpt
    from ..config import to_json
    from ..data import corpus_identity
    from ..engine import NonFiniteLossError, fit
    from ..evaluation import evaluate_text, format_telemetry
    from ..model import BitTransformerLM
    from ..scaling import grown_from

    corpus = open_corpus(data_dir, verify=verify_data)
    out = prepare_out(out, data_dir, fresh=not resume, corpus=corpus_identity(corpus.manifest))
    checkpoints = out / "checkpoints"
    ckpt.remove_stale_temporaries(checkpoints)  # a save killed midway may hold the newest step (its .old copy)
    try:
        with warnings.catch_warnings(record=True) as skipped:
            warnings.simplefilter("always", ckpt.CheckpointWarning)
            latest = ckpt.latest_checkpoint(checkpoints) if resume else None
    except ckpt.CheckpointError as err:
        raise click.UsageError(str(err)) from None
    for warning in skipped:  # one line each, not Python's file:line warning format
        click.echo(f"warning: {warning.message}", err=True)
    if latest is not None:
        saved = ckpt.read_config(latest)
        if saved != cfg.model and not grown_from(cfg.model, saved):
            raise click.UsageError(f"{out} holds checkpoints of a different model ({latest.name}); "
                                   "pass --no-resume to start over or choose another --out (a run begun "
                                   "before recipes existed resumes with --recipe original)")
    (out / "config.json").write_text(to_json(cfg))
    torch.manual_seed(cfg.train.seed)  # the initial weights are the seed's, like everything after them
    model = BitTransformerLM(cfg.model)
    click.echo(f"model: {cfg.model.arch}/{cfg.model.representation}, {model.num_parameters():,} parameters; "
               f"corpus: {corpus.train.n_bytes:,} train bytes, {corpus.val.n_bytes:,} val bytes")
    log_path, log = out / "metrics.jsonl", None
    resumed_step = int(latest.name.split("-")[1]) if latest is not None else 0

    def report(metrics, checkpoint):
        nonlocal log
        if log is None:
            # the steps after the resumed checkpoint run again: drop what the earlier run logged for them
            # (the first new record bounds it too, should fit resume from an older checkpoint)
            truncate_log(log_path, min(resumed_step, int(metrics["step"]) - 1))
            log = log_path.open("a")
        record = dict(metrics, time=time.time())
        if checkpoint is not None:
            record["checkpoint"] = str(checkpoint)
        log.write(json.dumps(record) + "\n")
        log.flush()
        score = _score_text(metrics)
        if score:
            click.echo(f"step {int(metrics['step'])}: {score}  {format_telemetry(metrics)}", err=True)

    try:
        result = fit(model, corpus, cfg, report=report, checkpoint_dir=checkpoints, resume_from=latest,
                     device=device, progress=progress)
    except NonFiniteLossError as err:
        raise click.ClickException(str(err)) from None
    except ValueError as err:  # a checkpoint it cannot resume from, a config the model cannot train with
        raise click.UsageError(str(err)) from None
    finally:
        if log is not None:
            log.close()
    model = result.model if result.model is not None else model  # progressive scaling returns the grown model
    ckpt.save_pretrained(model, out / "model")
    return model, corpus, result


def prepare_out(out: Path, data_dir: Path, *, fresh: bool, corpus=None) -> Path:
    """bitlm.rundir.prepare_run_directory for every command that writes a run: its refusals as one-line errors."""
    from ..rundir import RunDirectoryError, prepare_run_directory

    try:
        return prepare_run_directory(out, data_dir, fresh=fresh, corpus=corpus)
    except RunDirectoryError as err:
        raise click.BadParameter(str(err), param_hint=err.option) from None
    except OSError as err:
        raise click.BadParameter(f"{out}: {err.strerror or err}", param_hint="--out") from None


def truncate_log(path: Path, last_step: int) -> None:
    """Keep the records of metrics.jsonl up to `last_step` (and drop a line torn by a kill)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        step = record.get("step", 0) if isinstance(record, dict) else None
        if isinstance(step, (int, float)) and step <= last_step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _score_text(metrics) -> str:
    """'val bpb X' for causal runs, 'val ELBO bpb X (upper bound)' for diffusion runs, '' otherwise."""
    if "val/bpb" in metrics:
        return f"val bpb {metrics['val/bpb']:.4f}"
    if "val/elbo_bpb" in metrics:
        return f"val ELBO bpb {metrics['val/elbo_bpb']:.4f} (upper bound)"
    return ""


@click.command("train")
@click.option("--local", is_flag=True,
              help="Train in this process (no Ray, no MLflow): metrics.jsonl, checkpoints/ and model/ under --out.")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Corpus directory written by `bitlm prepare`.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Run directory. With Ray its name is the run name and its parent the storage path.")
@model_options
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from the newest checkpoint of the run if there is one.")
@diffusion_options
@click.option("--diffusion-curriculum", is_flag=True, help="Draw heavy noise early in training, uniform by the end.")
@click.option("--device", default=None, callback=loading.device,
              help="--local: torch device (default: cuda if available, else cpu).")
@click.option("--workers", type=int, default=None, help="Ray: training workers [run.num_workers=2].")
@click.option("--strategy", type=click.Choice(RAY_STRATEGIES), default=None,
              help="Ray: data parallel (ddp), sharded data parallel (fsdp) or one pipeline stage per worker "
                   "[parallel.strategy=ddp].")
@click.option("--gpu", is_flag=True, help="Ray: one GPU per worker (NCCL).")
@click.option("--scaling", is_flag=True, help="Grow the model (depth, width, context) when val loss plateaus.")
@click.option("--qat", is_flag=True, help="4-bit quantization-aware training (train.qat; needs torchao, "
              "`pip install 'bitlm[quant]'`); convert afterwards with `bitlm quantize --int4`.")
@click.option("--address", default=None, help="Ray: cluster address (default: RAY_ADDRESS, else the `bitlm cluster up --local` head, "
                   "else a new local Ray).")
@click.option("--verify-data/--no-verify-data", default=True, show_default=True,
              help="Check every shard's sha256 against the corpus manifest before training "
                   "(Ray: run.verify_data); skip it for corpora too large to hash at every start.")
@click.option("--auto-collapse", is_flag=True,
              help="At the end, distil the trained model into <out>/distilled as `bitlm distill` does.")
@click.option("--collapse-student", default="tiny", show_default=True,
              help="--auto-collapse: the student (a preset or a ModelConfig JSON file).")
@click.option("--collapse-floors", default="c=0.3,s=0.5", show_default=True, help="--auto-collapse: the floors.")
@click.option("--collapse-steps", type=click.IntRange(min=1), default=300, show_default=True,
              help="--auto-collapse: optimizer steps per distillation round.")
def train_command(local, data_dir, out_dir, preset, kind, recipe, config_file, sets, minutes, steps, resume, diffusion,
                  noise_schedule, diffusion_steps, diffusion_curriculum, device, workers, strategy, gpu, scaling, qat,
                  address, verify_data, auto_collapse, collapse_student, collapse_floors, collapse_steps):
    """Train a model on a prepared corpus.

    By default the run goes through Ray Train (a local Ray, or --address) with MLflow tracking
    (MLFLOW_TRACKING_URI, default sqlite:///<cwd>/mlflow.db; browse with `bitlm ui`); the final
    model lands in <out>/model and in MLflow. --local trains in this process instead. Validation
    bits-per-byte and K/C/S are reported at every evaluation. Training runs at the model's context
    (cut to the corpus's windows) unless train.context_bytes is set. Re-run the same command to resume
    (on the same corpus: a resume on another one is refused). --no-resume starts over, removing
    only what an earlier run wrote in --out; an --out holding other files, the corpus or the
    working directory is refused.
    """
    sets = diffusion_sets(diffusion, noise_schedule, diffusion_steps, diffusion_curriculum) + (
        ("scaling.enabled=true",) if scaling else ()) + (("train.qat=true",) if qat else ()) + tuple(sets)
    out = Path(out_dir)
    collapse = None
    if auto_collapse:  # its options fail before training does, not after
        collapse = _collapse_plan(diffusion, collapse_student, collapse_floors, collapse_steps, local, device, workers,
                                  strategy, address, data_dir, out)
    if local:
        cfg = build_experiment(preset, kind, config_file, sets, minutes, steps, recipe=recipe, data_dir=data_dir)
        _, _, result = run_local_training(cfg, Path(data_dir), out, resume=resume, device=device,
                                          progress=sys.stderr.isatty(), verify_data=verify_data)
        click.echo(f"done: {result.step} steps in {result.train_seconds:.0f} s; {_score_text(result.metrics)}; "
                   f"model saved to {out / 'model'}")
        if collapse is not None:
            collapse()
        return
    from pipelines.train import PipelineConfig, summary

    run = [f"run.data={Path(data_dir).resolve()}", f"run.name={out.resolve().name}",
           f"run.storage_path={out.resolve().parent}"]
    run += [f"run.num_workers={workers}"] if workers is not None else []
    run += [f"parallel.strategy={strategy}"] if strategy else []
    run += ["run.use_gpu=true"] if gpu else []
    run += [] if verify_data else ["run.verify_data=false"]
    cfg = build_experiment(preset, kind, config_file, tuple(run) + sets, minutes, steps, cls=PipelineConfig,
                           recipe=recipe, data_dir=data_dir)
    corpus_window(data_dir)  # a bad --data fails before an earlier run is cleared
    # Ray Train resumes whatever run sits at the same name and storage path: a fresh run clears it
    # (the driver checks the shards and, on a resume, that the corpus is the run's)
    prepare_out(out, Path(data_dir), fresh=not resume)
    result = run_ray_training(cfg, address)
    click.echo(summary(result) + f"; model saved to {out / 'model'}")
    if collapse is not None:
        collapse()


def _collapse_plan(diffusion, student, floors, steps, local, device, workers, strategy, address, data_dir, out):
    """--auto-collapse: check its options now; returns what runs `bitlm distill <out>/model` after training."""
    from ..config import MODEL_PRESETS
    from ..distill import parse_floors
    from .distill import distill_command

    if diffusion or strategy == "pipeline":
        raise click.BadParameter("distillation needs a causal model trained with ddp or fsdp; drop --diffusion, "
                                 "--strategy pipeline or --auto-collapse", param_hint="--auto-collapse")
    try:
        parse_floors(floors)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--collapse-floors") from None
    if student not in MODEL_PRESETS and not Path(student).is_file():
        raise click.BadParameter(f"{student!r} is neither a preset ({sorted(MODEL_PRESETS)}) nor a JSON file",
                                 param_hint="--collapse-student")
    ctx = click.get_current_context()
    ray_options = {} if local else {"workers": workers or 2, "strategy": strategy or "ddp", "address": address}

    def run():
        click.echo(f"auto-collapse: distilling {out / 'model'} into {out / 'distilled'}", err=True)
        ctx.invoke(distill_command, teacher=str(out / "model"), data_dir=str(data_dir), student=student,
                   floors_text=floors, local=local, out_dir=str(out / "distilled"), steps=steps, device=device,
                   allowed_roots=(str(out.resolve()),), **ray_options)
    return run


def run_ray_training(cfg, address):
    from ray.train import TrainingFailedError

    from pipelines.train import failure_text, run_training

    try:
        return run_training(cfg, address=address)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    except TrainingFailedError as err:  # Ray's pages of worker metadata, cut to the workers' own error
        raise click.ClickException(failure_text(err)) from None


DEMO_PRESET = "small"


@click.command("demo")
@click.option("--out", "out_dir", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--minutes", default=3.0, show_default=True, help="Training budget.")
@click.option("--max-corpus-bytes", default=4_000_000, show_default=True,
              help="How much of the standard-library sources to prepare.")
def demo_command(out_dir, minutes, max_corpus_bytes):
    """Prepare the default corpus, train the small preset on Ray Train with MLflow tracking, report and sample.

    Local Ray, one worker; MLflow in MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db (`bitlm ui` to browse).
    """
    from ..baselines import compressor_bpb
    from ..checkpoint import from_pretrained
    from ..data import Corpus, prepare_corpus
    from ..evaluation import evaluate_text, format_telemetry
    from ..sampling import generate
    from pipelines.train import PipelineConfig

    out = Path(out_dir).resolve()
    data_dir = out / "data"
    if not (data_dir / "manifest.json").exists():
        click.echo(f"preparing up to {max_corpus_bytes:,} bytes of Python standard-library sources ...")
        prepare_corpus(None, data_dir, max_bytes=max_corpus_bytes, progress=True)
    run_dir = prepare_out(out / "run", data_dir, fresh=True)  # a demo is a fresh run, never a resumed one
    defaults = (f"run.data={data_dir}", "run.name=run", f"run.storage_path={out}", "run.experiment=bitlm-demo",
                "run.num_workers=1", "run.cpus_per_worker=2", "train.eval_every_steps=100", "train.warmup_steps=50")
    # trained at the preset's own context, the one it is scored at (build_experiment)
    cfg = build_experiment(DEMO_PRESET, DEFAULT_KIND, None, (), minutes, None, cls=PipelineConfig, defaults=defaults,
                           data_dir=data_dir)
    click.echo(f"training {cfg.model.arch} {DEMO_PRESET} ({cfg.train.context_bytes}-byte context) for {minutes:g} min "
               "on Ray Train (1 worker), tracked in MLflow ...")
    result = run_ray_training(cfg, None)
    m = result.metrics
    model = from_pretrained(run_dir / "model")
    corpus = Corpus.open(data_dir)
    val_bytes = next(iter(corpus.val.sequential_batches(64, 1024, max_batches=1))).numpy().tobytes()
    ref = compressor_bpb(val_bytes)
    scored = evaluate_text(model.eval(), val_bytes)  # the model on the very bytes the compressors get
    click.echo("")
    click.echo(f"trained {int(m['step'])} steps in {m['train_seconds']:.0f} s")
    click.echo(f"val bits/byte on the same {len(val_bytes):,} bytes: model {scored['bpb']:.3f} | "
               f"gzip -9 {ref['gzip-9']:.3f} | xz -9e {ref['xz-9e']:.3f}")
    click.echo(f"telemetry of the model's predictions on val: {format_telemetry(m)}")
    sample = generate(model, "def ", 160, temperature=0.8, seed=0)
    click.echo(f"sample (parity corrections: {sample.n_parity_corrections}):\n{sample.text}")
    run_id = (run_dir / "mlflow_run_id").read_text().strip() if (run_dir / "mlflow_run_id").exists() else "?"
    click.echo(f"\nmodel: {run_dir / 'model'}   MLflow run: {run_id} (experiment bitlm-demo; `bitlm ui` to browse)")
    _serve_one_request(run_dir / "model", out)


def _serve_one_request(model_dir: Path, out: Path) -> None:
    """Serve the demo model on 127.0.0.1 with Ray Serve, send one gated request, print it, shut down."""
    import urllib.request

    from ray import serve as ray_serve

    from serve.app import build_app
    from serve.local import free_port

    port = free_port()
    app = build_app({"model": str(model_dir), "allowed_roots": [str(out)], "num_cpus": 0.5,
                     "audit_log": str(out / "serve_audit.jsonl")})
    ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        ray_serve.run(app, name="bitlm-demo", route_prefix="/", blocking=False)
        body = {"prompt": "def ", "max_new_bytes": 64, "temperature": 0.8, "seed": 0}
        url = f"http://127.0.0.1:{port}/v1/generate"
        click.echo(f"\nserving the model with Ray Serve; one gated request:\n"
                   f"$ curl -s {url} -H 'Content-Type: application/json' -d '{json.dumps(body)}'")
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            reply = json.loads(response.read())
        click.echo(json.dumps(reply, indent=2))
        click.echo(f"audit log: {out / 'serve_audit.jsonl'}   (serve it yourself: bitlm serve --model {model_dir})")
    finally:
        ray_serve.shutdown()
