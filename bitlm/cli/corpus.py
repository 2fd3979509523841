"""Opening a prepared corpus for a command, its errors as one-line --data errors."""

from __future__ import annotations

from pathlib import Path

import click


def open_corpus(data_dir: Path, *, verify: bool):
    """bitlm.data.Corpus.open, its errors as one-line --data errors."""
    from ..data import Corpus

    try:
        return Corpus.open(data_dir, verify=verify)
    except (OSError, ValueError) as err:
        raise click.BadParameter(str(err), param_hint="--data") from None
