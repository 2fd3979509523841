"""`bitlm quantize`: an INT8 or 4-bit copy of a model for CPU inference, with its size and bits per weight."""

from __future__ import annotations

from pathlib import Path

import click

from . import loading


@click.command("quantize")
@click.argument("model_dir", callback=loading.model_dir)
@click.option("--int8", "method", flag_value="int8", help="INT8 weights, activations quantized per call.")
@click.option("--int4", "method", flag_value="int4", help="4-bit grouped weights (torchao; best after `train --qat`).")
@click.option("--group-size", type=click.Choice(["32", "64", "128", "256"]), default="32", show_default=True,
              help="--int4: input columns per scale and zero.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory to write (the save_pretrained layout; config.json records the quantization).")
def quantize_command(model_dir, method, group_size, out_dir):
    """Quantize the full-precision model in MODEL_DIR (a model, checkpoint or run directory, or
    hf://user/repo) and save it
    to --out; prints the file sizes and the stored bits per weight. The result loads anywhere a model
    does (generate, eval, serve), on CPU."""
    from ..checkpoint import WEIGHTS, from_pretrained, read_quantization, save_pretrained
    from ..quantization import quantize_dynamic, quantize_int4, storage_report

    if method is None:
        raise click.UsageError("choose --int8 or --int4")
    if (done := read_quantization(model_dir)) is not None:
        raise click.BadParameter(f"{model_dir} is already quantized ({done['method']}); quantize the "
                                 "full-precision model", param_hint="'MODEL_DIR'")
    out = Path(out_dir)
    if out.resolve() == Path(model_dir).resolve():
        raise click.BadParameter("--out must not be MODEL_DIR (it would replace the full-precision model)",
                                 param_hint="'--out'")
    model = from_pretrained(model_dir)
    try:
        quantized = quantize_dynamic(model) if method == "int8" else quantize_int4(model, group_size=int(group_size))
    except RuntimeError as err:  # a missing backend (torchao)
        raise click.ClickException(str(err)) from None
    save_pretrained(quantized, out)
    report = storage_report(quantized)
    before, after = (Path(model_dir) / WEIGHTS).stat().st_size, (out / WEIGHTS).stat().st_size
    click.echo(f"{method}: {out / WEIGHTS} {after:,} bytes ({after / before:.3f} of {before:,})")
    quantized_bits = report["quantized_bits_per_weight"]
    click.echo(f"bits per weight: quantized layers {quantized_bits:.3f} "
               f"({100 * report['quantized_weight_share']:.1f}% of linear weights), "
               f"all linear layers {report['linear_bits_per_weight']:.3f}, "
               f"whole model {report['bits_per_parameter']:.3f} per parameter")
