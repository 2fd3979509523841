"""Click callbacks of the commands that load a model: MODEL_DIR, --device, text, finite numbers, seeds."""

from __future__ import annotations

import math
from pathlib import Path

import click

SEEDS = click.IntRange(0, 2**63 - 1)  # what the HTTP API takes too (serve.schemas.GenerateRequest.seed)
DEVICE_TYPES = ("cpu", "cuda", "mps")


def model_dir(ctx: click.Context, param: click.Parameter, value: str) -> Path:
    """The model directory `value` names (a run directory resolves to its model), checked without loading it.

    `hf://user/repo[@revision]` is downloaded from the Hugging Face Hub first (bitlm.hub.download).
    The message of a bad one is bitlm.checkpoint's, the same line `bitlm serve` prints.
    """
    from ..checkpoint import CheckpointError, resolve_pretrained, validate_pretrained

    try:
        if value.startswith("hf://"):
            from ..hub import download

            repo_id, _, revision = value.removeprefix("hf://").partition("@")
            value = download(repo_id, revision=revision or None)
        directory = resolve_pretrained(value)
        validate_pretrained(directory)
    except CheckpointError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from None
    return directory


def device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A torch device this machine has (cpu, cuda, cuda:N, mps), or None for the default."""
    if value is None:
        return None
    import torch

    try:
        parsed = torch.device(value)
    except (RuntimeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in DEVICE_TYPES:
        raise click.BadParameter(f"{value!r} is not a device; use cpu, cuda, cuda:N or mps", ctx=ctx, param=param)
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter(f"{value!r}: this machine has no CUDA device (use cpu)", ctx=ctx, param=param)
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise click.BadParameter(f"{value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                                 ctx=ctx, param=param)
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise click.BadParameter(f"{value!r}: MPS is not available on this machine (use cpu)", ctx=ctx, param=param)
    return value


def utf8_text(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """The value unless it holds bytes that are not UTF-8 (the shell passes them through as surrogates)."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raw = value.encode("utf-8", "surrogateescape")
            raise click.BadParameter(f"not UTF-8 text (byte 0x{raw[err.start]:02x} at character {err.start})",
                                     ctx=ctx, param=param) from None
    return value


def finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """The value unless it is nan or infinite (click's FloatRange lets nan through)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", ctx=ctx, param=param)
    return value


def optional_model_dir(ctx: click.Context, param: click.Parameter, value: str | None) -> Path | None:
    """model_dir for an optional option."""
    return None if value is None else model_dir(ctx, param, value)
