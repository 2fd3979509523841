"""The `bitlm` command line: one click group; each command lives in its own module."""

from __future__ import annotations

import os

import click

from . import console
from .distill import distill_command
from .generate import generate_command
from .hub import hub_group
from .prepare import prepare_command
from .quantize import quantize_command
from .score import eval_command
from .serve import serve_command
from .train import demo_command, train_command
from .tune import tune_command
from .ui import ui_command


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="bitlm")
@click.option("-v", "--verbose", is_flag=True,
              help=f"Show Ray, Ray Serve and MLflow output in full (also: {console.VERBOSE_ENV}=1).")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """bitlm: train, evaluate and sample bit-native language models.

    \b
    Typical session:
      bitlm prepare ../shared/data/tinyshakespeare.txt --out data/shakespeare
      bitlm train --local --data data/shakespeare --out runs/s1 --preset small --minutes 10
      bitlm eval runs/s1/model some_text.txt
      bitlm generate runs/s1/model --prompt "ROMEO:" --max-new-bytes 200
      bitlm serve --model runs/s1/model --port 8000
    """
    if verbose:
        os.environ[console.VERBOSE_ENV] = "1"  # child processes (a local Ray's workers) see it too
    if ctx.invoked_subcommand in _RAY_COMMANDS:
        console.quiet()
    if ctx.invoked_subcommand in _RAY_COMMANDS - {"cluster"}:
        _join_recorded_cluster()


# Commands that start or join Ray; only these pay for importing it to quiet its output.
_RAY_COMMANDS = {"train", "demo", "serve", "tune", "cluster", "distill"}


def _join_recorded_cluster() -> None:
    """After `bitlm cluster up --local`, commands run there: its addresses become the environment's defaults.

    An --address flag still wins (commands read it before RAY_ADDRESS), and so do RAY_ADDRESS and
    MLFLOW_TRACKING_URI when already set; with no live recorded cluster nothing changes.
    """
    from cluster.state import recorded_addresses

    recorded = recorded_addresses()
    if recorded:
        os.environ.setdefault("RAY_ADDRESS", recorded["ray"])
        os.environ.setdefault("MLFLOW_TRACKING_URI", recorded["mlflow"])


class _LazyGroup(click.Group):
    """A subcommand group imported only when invoked (or its help is asked for)."""

    def __init__(self, name: str, target: str, **kwargs):
        super().__init__(name, **kwargs)
        self._target = target

    def _group(self) -> click.Group:
        import importlib

        module, attr = self._target.split(":")
        return getattr(importlib.import_module(module), attr)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return self._group().list_commands(ctx)

    def get_command(self, ctx: click.Context, name: str):
        return self._group().get_command(ctx, name)

    def format_help_text(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self.help = self._group().help
        super().format_help_text(ctx, formatter)


main.add_command(prepare_command)
main.add_command(train_command)
main.add_command(eval_command)
main.add_command(generate_command)
main.add_command(demo_command)
main.add_command(ui_command)
main.add_command(serve_command)
main.add_command(distill_command)
main.add_command(tune_command)
main.add_command(quantize_command)
main.add_command(hub_group)
main.add_command(_LazyGroup("cluster", "cluster.cli:cluster_group",
                            short_help="Start, stop and use a Ray cluster (local head + MLflow, AWS, GCP)."))
