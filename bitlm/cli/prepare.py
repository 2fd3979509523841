"""`bitlm prepare`: text files, directories or globs to Parquet shards of byte windows.

`corpus_options` is the one option set of `bitlm prepare` and `python -m pipelines.prepare`.
"""

from __future__ import annotations

import click

_CORPUS_OPTIONS = (
    click.argument("sources", nargs=-1),
    click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
                 help="Directory for the shards and manifest.json (give an absolute path under `ray job submit`, "
                      "whose cwd is a temporary copy)."),
    click.option("--window-bytes", default=1024, show_default=True, help="Bytes per stored window (>= 2)."),
    click.option("--val-fraction", default=0.1, show_default=True,
                 help="Fraction of the byte stream, taken from its end, kept for validation, in [0, 1)."),
    click.option("--max-bytes", type=int, default=None, help="Stop reading after this many bytes."),
    click.option("--shard-windows", default=8192, show_default=True, help="Windows per Parquet shard."),
    click.option("--quiet", is_flag=True, help="No progress bar."),
)


def corpus_options(command):
    """SOURCES, --out, --window-bytes, --val-fraction, --max-bytes, --shard-windows and --quiet on a command."""
    for decorate in reversed(_CORPUS_OPTIONS):
        command = decorate(command)
    return command


def prepared_summary(manifest: dict, out_dir) -> str:
    """The one line both prepare commands print."""
    splits = manifest["splits"]
    return (f"prepared {manifest['n_files']} file(s), {manifest['n_bytes_total']:,} bytes -> {out_dir}: "
            f"train {splits['train']['n_windows']} windows, val {splits['val']['n_windows']} windows "
            f"of {manifest['window_bytes']} bytes")


@click.command("prepare")
@corpus_options
def prepare_command(sources, out_dir, window_bytes, val_fraction, max_bytes, shard_windows, quiet):
    """Turn SOURCES (files, directories, globs) into a training corpus.

    With no SOURCES, the running Python's standard-library sources are used (present on every
    machine). Files are concatenated in sorted order; the last --val-fraction of the bytes is the
    validation split. Writes {train,val}-NNNNN.parquet and manifest.json (sizes, sha256 per shard,
    per-phase bit marginals) into --out.
    """
    from ..data import prepare_corpus

    try:
        manifest = prepare_corpus(list(sources) or None, out_dir, window_bytes=window_bytes,
                                  val_fraction=val_fraction, shard_windows=shard_windows,
                                  max_bytes=max_bytes, progress=not quiet)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    except OSError as err:  # an unreadable source or an unwritable --out: one line naming the path
        raise click.ClickException(f"{err.filename or out_dir}: {err.strerror or err}") from None
    click.echo(prepared_summary(manifest, out_dir))
