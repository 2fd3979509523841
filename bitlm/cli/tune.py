"""`bitlm tune`: a Ray Tune search over a named (or file) space; every trial a Ray Train run tracked in MLflow."""

from __future__ import annotations

from pathlib import Path

import click

from .options import build_experiment, model_options

# what a tune trial gets unless --config / --set say otherwise: one worker, so trials (not workers) share the CPUs
TUNE_DEFAULTS = ("run.num_workers=1", "run.cpus_per_worker=1.0", "run.experiment=bitlm-tune")


class _TuneCommand(click.Command):
    """Appends each named space, described by tune.spaces itself, to the help text."""

    def format_help_text(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_help_text(ctx, formatter)
        from tune.spaces import NAMED, describe  # lazily: bitlm imports tune only inside commands

        with formatter.section("Spaces (--space)"):
            for space in NAMED.values():
                lines = describe(space).splitlines()
                formatter.write_text(lines[0])
                formatter.write("".join(" " * formatter.current_indent + line + "\n" for line in lines[1:]))
                formatter.write_paragraph()


def tune_options(fn):
    """The search's own options (shared by `bitlm tune` and `python -m tune.search`)."""
    options = [
        click.option("--space", required=True, metavar="diffusion|telemetry|representation|FILE",
                     help="A named space (listed above) or a JSON / YAML file of the same structure "
                          "(see tune/examples/)."),
        click.option("--num-samples", type=click.IntRange(min=1), default=8, show_default=True,
                     help="Random search: trials. Grid search: repeats of the whole grid."),
        click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False), default=None,
                     help="Corpus directory written by `bitlm prepare` [run.data of --config]."),
        click.option("--search", type=click.Choice(["random", "grid"]), default=None,
                     help="Random sampling or a grid (choices, plus --grid-points per range) [the space's own]."),
        click.option("--grid-points", type=click.IntRange(min=1), default=3, show_default=True,
                     help="Grid search: evenly spaced points per range (geometric for log ranges)."),
        click.option("--scheduler", type=click.Choice(["asha", "fifo"]), default="asha", show_default=True,
                     help="asha stops losing trials early; fifo runs every trial to its budget (equal wall-clock)."),
        click.option("--grace-period", type=click.IntRange(min=1), default=1, show_default=True,
                     help="ASHA: evaluations before a trial may be stopped."),
        click.option("--reduction-factor", type=click.IntRange(min=2), default=2, show_default=True,
                     help="ASHA: keep the best 1/N of the trials at each rung."),
        click.option("--max-t", type=click.IntRange(min=1), default=100, show_default=True,
                     help="Evaluations at most per trial."),
        click.option("--max-concurrent", type=click.IntRange(min=1), default=None,
                     help="Trials at once [as many as the cluster can place; never more]."),
        click.option("--minutes-per-trial", type=float, default=None,
                     help="Wall-clock budget of every trial (train.max_seconds; equal budgets for the comparison)."),
        click.option("--trial-cpus", type=click.FloatRange(min=0, min_open=True), default=0.5, show_default=True,
                     help="CPUs the trial driver holds; its Train workers hold run.num_workers x run.cpus_per_worker."),
        click.option("--storage", "storage_path", default="runs/tune", show_default=True,
                     help="Where experiment directories go (shared storage or s3:// on a multi-node cluster)."),
        click.option("--name", default="", help="Experiment directory name [the space's name]."),
        click.option("--seed", type=int, default=0, show_default=True, help="Random search: the sampler's seed."),
        click.option("--probes", "n_probes", type=click.IntRange(min=1), default=32, show_default=True,
                     help="telemetry: probe streams per set (held-out text, repetition loops, random bytes)."),
        click.option("--stop-after", type=click.IntRange(min=1), default=None,
                     help="Start at most N trials in this session and end when they are done (the rest: --resume later)."),
        click.option("--resume", is_flag=True,
                     help="Continue the search in --storage/--name with Tuner.restore (finished trials are kept)."),
        click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a new local Ray)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.command("tune", cls=_TuneCommand)
@tune_options
@model_options
def tune_command(space, num_samples, data_dir, search, grid_points, scheduler, grace_period, reduction_factor, max_t,
                 max_concurrent, minutes_per_trial, trial_cpus, storage_path, name, seed, n_probes, stop_after, resume,
                 address, preset, kind, recipe, config_file, sets, minutes, steps):
    """Search hyperparameters with Ray Tune; every trial is a Ray Train run and an MLflow child run.

    The base config is --preset/--arch (or --config) with --set overrides; each trial applies its
    sampled values as dotted overrides on top. One MLflow parent run per search holds the results
    table, the best config and a plot of the objective against each parameter. At the end the
    best trial's full config is written as best_config.json, which `bitlm train --config` takes.
    """
    from tune.search import SearchConfig, run_search_cli
    from tune.spaces import load_space

    from pipelines.train import PipelineConfig

    try:
        loaded = load_space(space)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--space") from None
    if data_dir:
        sets = (f"run.data={Path(data_dir).resolve()}",) + tuple(sets)
    if minutes_per_trial is not None:
        minutes = minutes_per_trial
    base = build_experiment(preset, kind, config_file, tuple(sets), minutes, steps, cls=PipelineConfig,
                            defaults=TUNE_DEFAULTS, recipe=recipe, data_dir=data_dir)
    try:
        cfg = SearchConfig(space=loaded, base=base, num_samples=num_samples, search=search, grid_points=grid_points,
                           scheduler=scheduler, grace_period=grace_period, reduction_factor=reduction_factor,
                           max_t=max_t, max_concurrent=max_concurrent, trial_cpus=trial_cpus,
                           storage_path=storage_path, name=name, seed=seed, n_probes=n_probes, stop_after=stop_after)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    run_search_cli(cfg, resume=resume, address=address, echo=click.echo)

