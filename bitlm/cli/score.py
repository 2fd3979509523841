"""`bitlm eval`: bits per byte and K/C/S of a model on a text file, beside compressors."""

from __future__ import annotations

import typing
from pathlib import Path

import click

from ..config import NoiseSchedule
from . import loading


@click.command("eval")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False), callback=loading.model_dir)
@click.argument("text_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--max-bytes", type=click.IntRange(min=2), default=None, help="Score only the first N bytes.")
@click.option("--overlap-bytes", type=click.IntRange(min=0), default=None,
              help="Context carried between sliding windows (default: half the model's context).")
@click.option("--device", default=None, callback=loading.device,
              help="torch device (default: cuda if available, else cpu).")
@click.option("--noise-schedule", default="cosine", show_default=True,
              type=click.Choice(typing.get_args(NoiseSchedule)),
              help="Schedule of the ELBO estimate for diffusion models (the bound holds for any).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def eval_command(model_dir, text_file, max_bytes, overlap_bytes, noise_schedule, device, as_json):
    """Score TEXT_FILE under the model in MODEL_DIR (a model, checkpoint or run directory): bits per
    byte (every byte but the first) and mean K (negentropy), C (LZ complexity) and S (symbiosis)
    over 512-byte windows, with gzip -9 and xz -9e on the same bytes for reference."""
    import json

    from ..baselines import compressor_bpb
    from ..checkpoint import from_pretrained
    from ..engine import resolve_device
    from ..evaluation import evaluate_text

    try:
        data = Path(text_file).read_bytes()[:max_bytes]
    except OSError as err:
        raise click.BadParameter(f"{text_file}: cannot be read ({err.strerror})", param_hint="'TEXT_FILE'") from None
    if len(data) < 2:  # the first byte has no context: at least 2 bytes to score one
        raise click.BadParameter(f"{text_file}: {len(data)} byte(s) to score; at least 2 bytes are needed",
                                 param_hint="'TEXT_FILE'")
    model = from_pretrained(model_dir, device=resolve_device(device))
    context = model.config.max_input_ids // model.config.ids_per_byte
    if overlap_bytes is not None and overlap_bytes >= context:
        raise click.BadParameter(f"{overlap_bytes} must be below the model's context of {context} bytes",
                                 param_hint="'--overlap-bytes'")
    try:
        result = evaluate_text(model, data, overlap_bytes=overlap_bytes, noise_schedule=noise_schedule)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    result.update(compressor_bpb(data))
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{text_file}: {result['n_bytes']:,} bytes scored")
    model_score = (f"model {result['bpb']:.4f}" if "bpb" in result
                   else f"model ELBO {result['elbo_bpb']:.4f} (upper bound)")
    click.echo(f"bits/byte: {model_score} | gzip -9 {result['gzip-9']:.4f} | xz -9e {result['xz-9e']:.4f}")
    click.echo(f"K {result['K']:.3f}  C {result['C']:.3f}  S {result['S']:.3f}")
