"""`bitlm train --local` and `bitlm demo`: training in this process, with a metrics log and checkpoints."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import click

from .options import DEFAULT_KIND, build_experiment, diffusion_options, diffusion_sets, model_options


def run_local_training(cfg, data_dir: Path, out: Path, *, resume: bool, device, progress: bool):
    """Train per `cfg` on a prepared corpus; write config.json, metrics.jsonl, checkpoints/ and model/."""
    from .. import checkpoint as ckpt
    from ..config import to_json
    from ..data import Corpus
    from ..engine import fit
    from ..model import BitTransformerLM

    try:
        corpus = Corpus.open(data_dir)
    except (FileNotFoundError, ValueError) as err:
        raise click.BadParameter(str(err), param_hint="--data") from None
    checkpoints = out / "checkpoints"
    latest = ckpt.latest_checkpoint(checkpoints) if resume else None
    if latest is not None and ckpt.read_config(latest) != cfg.model:
        raise click.UsageError(f"{out} holds checkpoints of a different model ({latest.name}); "
                               "pass --no-resume to start over or choose another --out")
    if not resume and checkpoints.exists():
        # a fresh run must neither prune its own checkpoints against an old run's nor be resumed as it later
        shutil.rmtree(checkpoints)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(to_json(cfg))
    model = BitTransformerLM(cfg.model)
    click.echo(f"model: {cfg.model.arch}/{cfg.model.representation}, {model.num_parameters():,} parameters; "
               f"corpus: {corpus.train.n_bytes:,} train bytes, {corpus.val.n_bytes:,} val bytes")
    log = (out / "metrics.jsonl").open("a")

    def report(metrics, checkpoint):
        record = dict(metrics, time=time.time())
        if checkpoint is not None:
            record["checkpoint"] = str(checkpoint)
        log.write(json.dumps(record) + "\n")
        log.flush()
        score = _score_text(metrics)
        if score:
            click.echo(f"step {int(metrics['step'])}: {score}  "
                       f"K {metrics['val/K']:.3f}  C {metrics['val/C']:.3f}  S {metrics['val/S']:.3f}", err=True)

    try:
        result = fit(model, corpus, cfg.train, diffusion=cfg.diffusion, report=report, checkpoint_dir=checkpoints,
                     resume=resume, device=device, progress=progress)
    finally:
        log.close()
    ckpt.save_pretrained(model, out / "model")
    return model, corpus, result


def _score_text(metrics) -> str:
    """'val bpb X' for causal runs, 'val ELBO bpb X (upper bound)' for diffusion runs, '' otherwise."""
    if "val/bpb" in metrics:
        return f"val bpb {metrics['val/bpb']:.4f}"
    if "val/elbo_bpb" in metrics:
        return f"val ELBO bpb {metrics['val/elbo_bpb']:.4f} (upper bound)"
    return ""


@click.command("train")
@click.option("--local", is_flag=True, default=True, show_default=True,
              help="Train in this process on this machine's devices (the only mode the library offers; "
                   "distributed runs go through the Ray pipelines).")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Corpus directory written by `bitlm prepare`.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Run directory: config.json, metrics.jsonl, checkpoints/, model/.")
@model_options
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from the newest checkpoint in <out>/checkpoints if there is one.")
@diffusion_options
@click.option("--diffusion-curriculum", is_flag=True, help="Draw heavy noise early in training, uniform by the end.")
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
def train_command(local, data_dir, out_dir, preset, kind, config_file, sets, minutes, steps, resume, diffusion,
                  noise_schedule, diffusion_steps, diffusion_curriculum, device):
    """Train a model on a prepared corpus and save it to <out>/model.

    Validation bits-per-byte and K/C/S are printed at every evaluation; every metric goes to
    <out>/metrics.jsonl. Interrupt and re-run the same command to resume exactly.
    """
    sets = diffusion_sets(diffusion, noise_schedule, diffusion_steps, diffusion_curriculum) + tuple(sets)
    cfg = build_experiment(preset, kind, config_file, sets, minutes, steps)
    _, _, result = run_local_training(cfg, Path(data_dir), Path(out_dir), resume=resume, device=device,
                                      progress=sys.stderr.isatty())
    m = result.metrics
    click.echo(f"done: {result.step} steps in {result.train_seconds:.0f} s; {_score_text(m)}; "
               f"model saved to {Path(out_dir) / 'model'}")


@click.command("demo")
@click.option("--out", "out_dir", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--minutes", default=3.0, show_default=True, help="Training budget.")
@click.option("--max-corpus-bytes", default=4_000_000, show_default=True,
              help="How much of the standard-library sources to prepare.")
def demo_command(out_dir, minutes, max_corpus_bytes):
    """Prepare the default corpus, train the tiny preset, report bpb and K/C/S, and sample."""
    from ..baselines import compressor_bpb
    from ..data import prepare_corpus
    from ..sampling import generate

    out = Path(out_dir)
    data_dir = out / "data"
    if not (data_dir / "manifest.json").exists():
        click.echo(f"preparing up to {max_corpus_bytes:,} bytes of Python standard-library sources ...")
        prepare_corpus(None, data_dir, max_bytes=max_corpus_bytes, progress=True)
    cfg = build_experiment("tiny", DEFAULT_KIND, None, ("train.eval_every=100", "train.warmup_steps=50"), minutes, None)
    model, corpus, result = run_local_training(cfg, data_dir, out / "run", resume=False, device=None, progress=True)
    m = result.metrics
    val_sample = corpus.val.sequential_batches(64, 1024, max_batches=1)
    val_bytes = next(iter(val_sample)).numpy().tobytes()
    ref = compressor_bpb(val_bytes)
    click.echo("")
    click.echo(f"trained {result.step} steps in {result.train_seconds:.0f} s")
    click.echo(f"val bits/byte: model {m['val/bpb']:.3f} | gzip -9 {ref['gzip-9']:.3f} | xz -9e {ref['xz-9e']:.3f} "
               f"(compressors on {len(val_bytes):,} val bytes)")
    click.echo(f"telemetry on val: K {m['val/K']:.3f}  C {m['val/C']:.3f}  S {m['val/S']:.3f}")
    sample = generate(model, "def ", 160, temperature=0.8, seed=0)
    click.echo(f"sample (parity corrections: {sample.n_parity_corrections}):\n{sample.text}")
    click.echo(f"\nmodel: {out / 'run' / 'model'}   metrics: {out / 'run' / 'metrics.jsonl'}")
