"""`bitlm hub push|pull`: the save_pretrained layout to and from the Hugging Face Hub (token from HF_TOKEN only)."""

from __future__ import annotations

from pathlib import Path

import click

from . import loading


@click.group("hub")
def hub_group():
    """Push models to and pull them from the Hugging Face Hub (HF_TOKEN for private repositories and pushes;
    HF_ENDPOINT for another Hub; HF_HUB_OFFLINE=1 to use the local cache only)."""


@hub_group.command("push")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False), callback=loading.model_dir)
@click.argument("repo_id")
@click.option("--private/--public", default=True, show_default=True, help="Visibility if the repository is new.")
@click.option("--eval-text", type=click.Path(exists=True, dir_okay=False),
              help="Measure bits per byte on this text (with gzip -9 and xz -9e) for the model card.")
@click.option("--baseline", type=click.Path(exists=True, file_okay=False), callback=loading.optional_model_dir,
              help="--eval-text: a byte-baseline model directory to measure beside it.")
@click.option("--max-bytes", type=click.IntRange(min=2), default=100_000, show_default=True,
              help="--eval-text: score only the first N bytes.")
def push_command(model_dir, repo_id, private, eval_text, baseline, max_bytes):
    """Upload MODEL_DIR (config.json, model.safetensors and a generated model card) to REPO_ID (user/name).

    The card holds only facts read from the directory and its run (config, parameter count,
    corpus manifest hash, training settings, last validation bpb) and what --eval-text measures.
    The token is read from HF_TOKEN; it is never printed or written anywhere.
    """
    from ..hub import HubError, check_repo_id, push_to_hub

    try:
        check_repo_id(repo_id)
    except HubError as err:
        raise click.BadParameter(str(err), param_hint="'REPO_ID'") from None
    measured = _measure(model_dir, baseline, eval_text, max_bytes) if eval_text else None
    try:
        commit = push_to_hub(model_dir, repo_id, private=private, measured=measured)
    except HubError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"pushed {model_dir} to {repo_id} (commit {commit})")


def _measure(model_dir: Path, baseline, text_file: str, max_bytes: int) -> dict[str, float]:
    from ..baselines import compressor_bpb
    from ..checkpoint import from_pretrained
    from ..evaluation import evaluate_text

    data = Path(text_file).read_bytes()[:max_bytes]
    if len(data) < 2:
        raise click.BadParameter(f"{text_file}: at least 2 bytes are needed", param_hint="'--eval-text'")
    name = Path(text_file).name
    measured = {f"this model on {name}": evaluate_text(from_pretrained(model_dir), data)["bpb"]}
    if baseline is not None:
        measured[f"byte baseline ({baseline.name}) on {name}"] = evaluate_text(from_pretrained(baseline), data)["bpb"]
    compressors = compressor_bpb(data)
    measured |= {f"{k} on {name}": compressors[k] for k in ("gzip-9", "xz-9e")}
    return measured


@hub_group.command("pull")
@click.argument("repo_id")
@click.option("--revision", default=None, help="Branch, tag or commit (default: main).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Copy the model here (default: leave it in the Hugging Face cache and print its path).")
def pull_command(repo_id, revision, out_dir):
    """Download REPO_ID's model, check it against the Hub's file hashes and bitlm's own checks, print where it is."""
    import shutil

    from ..hub import FILES, HubError, download

    try:
        local = download(repo_id, revision=revision)
    except HubError as err:
        raise click.ClickException(str(err)) from None
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            shutil.copyfile(local / name, out / name)
        local = out
    click.echo(str(local))
