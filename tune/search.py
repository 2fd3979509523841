"""The Tuner: every trial is a Ray Train run (pipelines.train.train_driver) and an MLflow child run.

Ray's split (doc_code/train_tune_interop.py): `run_trial` is Tune's function trainable, one
training run per trial; `run_search` builds the Tuner (ASHA or FIFO, random or grid search),
restores it when asked, and writes the results table, the best config and the MLflow parent.
`python -m tune.search ...` is the `ray job submit` entry point (the options of `bitlm tune`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from bitlm.config import apply_overrides, flatten, from_dict, to_dict
from pipelines.train import PipelineConfig

from .spaces import METRIC, Space, assignment_strings, space_from_dict, to_tune, trial_assignments, validate
from .stopping import STOP_FILE, Scheduler, make_reporter, make_scheduler, make_search_alg

PARENT_TAG = "mlflow.parentRunId"  # MLflow's nesting tag (mlflow.utils.mlflow_tags.MLFLOW_PARENT_RUN_ID)
TRIAL_TAG = "bitlm.tune.trial_id"
RUN_ID_FILE = "mlflow_run_id"  # the name train_driver reuses, so a resumed trial logs into the same child
PARENT_ID_FILE = "mlflow_parent_run_id"


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """One search: a space over a base config, its scheduler, its resources and where it lives."""

    space: Space
    base: PipelineConfig
    num_samples: int = 8  # random: trials; grid: repeats of the grid
    search: Optional[Literal["random", "grid"]] = None  # None: the space's default
    grid_points: int = 3  # grid search: points per range
    scheduler: Scheduler = "asha"
    grace_period: int = 1  # evaluations before ASHA may stop a trial
    reduction_factor: int = 2
    max_t: int = 100  # evaluations at most per trial
    max_concurrent: Optional[int] = None  # None: as many as the cluster can place
    trial_cpus: float = 0.5  # the trial driver (it waits on its Train run); its workers come on top
    storage_path: str = "runs/tune"
    name: str = ""  # experiment directory under storage_path; default: the space's name
    seed: int = 0  # random search: the sampler's seed
    n_probes: int = 32  # gate probe streams per set (bpb+gate objective)
    stop_after: Optional[int] = None  # end this session after N trials complete (resume later)

    def __post_init__(self) -> None:
        checks = [(self.num_samples >= 1, "num_samples", "must be >= 1"),
                  (self.grid_points >= 1, "grid_points", "must be >= 1"),
                  (self.grace_period >= 1, "grace_period", "must be >= 1"),
                  (self.reduction_factor >= 2, "reduction_factor", "must be >= 2"),
                  (self.max_t >= self.grace_period, "max_t", "must be >= grace_period"),
                  (self.max_concurrent is None or self.max_concurrent >= 1, "max_concurrent", "must be >= 1"),
                  (self.trial_cpus > 0, "trial_cpus", "must be > 0 (Tune refuses 0; use a fraction)"),
                  (self.n_probes >= 1, "n_probes", "must be >= 1"),
                  (self.stop_after is None or self.stop_after >= 1, "stop_after", "must be >= 1"),
                  (self.scheduler in ("asha", "fifo"), "scheduler", "must be 'asha' or 'fifo'")]
        for ok, name, message in checks:
            if not ok:
                raise ValueError(f"tune.{name}: {message}, got {getattr(self, name)!r}")

    @property
    def experiment_dir(self) -> Path:
        return Path(self.storage_path).resolve() / (self.name or self.space.name)

    @property
    def search_kind(self) -> str:
        return self.search or self.space.search


# ----------------------------------------------------------------------------------------------
# resources


def trial_demand(base: PipelineConfig, trial_cpus: float) -> dict[str, float]:
    """What one trial holds while it runs: its driver plus its Train workers."""
    run = base.run
    return {"CPU": trial_cpus + run.num_workers * run.cpus_per_worker, "GPU": float(run.num_workers if run.use_gpu else 0)}


def placeable_trials(demand: dict[str, float], cluster: dict[str, float]) -> int:
    """How many trials the cluster can run at once (0: not even one fits)."""
    counts = [math.floor(cluster.get(name, 0.0) / need + 1e-9) for name, need in demand.items() if need > 0]
    return min(counts) if counts else 0


def concurrency(demand: dict[str, float], cluster: dict[str, float], requested: Optional[int]) -> tuple[int, str]:
    """(max_concurrent_trials, the line that says how it was chosen); ValueError when no trial fits."""
    fits = placeable_trials(demand, cluster)
    need = ", ".join(f"{v:g} {k}" for k, v in demand.items() if v > 0)
    have = ", ".join(f"{cluster.get(k, 0.0):g} {k}" for k in demand if demand[k] > 0)
    if fits < 1:
        raise ValueError(f"tune: a trial needs {need} (driver + run.num_workers x run.cpus_per_worker) but the "
                         f"cluster has {have}; lower run.num_workers, run.cpus_per_worker or --trial-cpus")
    if requested is None:
        return fits, f"concurrency: {fits} trial(s) at a time (each holds {need}; the cluster has {have})"
    if requested > fits:
        return fits, (f"concurrency: {fits} trial(s) at a time, not the {requested} asked for (each holds {need}; "
                      f"the cluster has {have}; more would sit PENDING)")
    return requested, f"concurrency: {requested} trial(s) at a time, as asked (each holds {need}; the cluster has {have})"


# ----------------------------------------------------------------------------------------------
# in the trial


def trial_config(space: Space, base: PipelineConfig, config: dict[str, Any], trial_id: str,
                 runs_dir: Path) -> PipelineConfig:
    """The trial's PipelineConfig: the sampled values on `base`, the Train run named after the trial."""
    cfg = apply_overrides(base, assignment_strings(trial_assignments(space, config)))
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=trial_id, storage_path=str(runs_dir)))


def _measure_gate(cfg: PipelineConfig, n_probes: int) -> dict[str, float]:
    """The gate of cfg.safety on the probe sets, against the corpus' validation split and marginals."""
    import numpy as np

    from bitlm.data import Corpus

    from .probes import gate_error_rates

    corpus = Corpus.open(cfg.run.data)
    val_text = np.ascontiguousarray(corpus.val.to_numpy()).tobytes()
    return gate_error_rates(val_text, corpus.phase_marginals(cfg.model.parity), cfg.safety,
                            parity=cfg.model.parity, n_probes=n_probes, seed=cfg.train.seed)


def _child_run(cfg: PipelineConfig, space: Space, config: dict[str, Any], trial_id: str, parent_run_id: str,
               uri: str) -> str:
    """The trial's MLflow child run: created once with the full flattened config, reused when the trial resumes."""
    from pipelines.tracking import RunTracker

    id_file = Path(cfg.run.storage_path) / cfg.run.name / RUN_ID_FILE
    if id_file.exists():
        return id_file.read_text().strip()
    params = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in flatten(cfg).items()}
    params |= {f"search.{k}": v for k, v in config.items() if "." not in k}  # bundle labels, e.g. search.kind
    tracker = RunTracker.start(cfg.run.experiment, trial_id, params, system_metrics=False, uri=uri,
                               tags={PARENT_TAG: parent_run_id, TRIAL_TAG: trial_id, "bitlm.tune.space": space.name,
                                     "bitlm.strategy": cfg.parallel.strategy, "bitlm.arch": cfg.model.arch})
    id_file.parent.mkdir(parents=True, exist_ok=True)
    id_file.write_text(tracker.run_id)
    return tracker.run_id


def run_trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """Tune's trainable: one Train run per trial, named after the trial id (a restored trial resumes it)."""
    from ray import tune

    from pipelines.train import train_driver

    space = space_from_dict(setup["space"])
    base = from_dict(PipelineConfig, setup["base"])
    trial_id = tune.get_context().get_trial_id()
    # train_driver reads the store from the environment; this actor may predate the search's setting
    os.environ["MLFLOW_TRACKING_URI"] = setup["tracking_uri"]
    cfg = trial_config(space, base, config, trial_id, Path(setup["runs_dir"]))
    gate = _measure_gate(cfg, setup["n_probes"]) if space.objective == "bpb+gate" else {}
    run_id = None
    if cfg.run.tracking and setup.get("parent_run_id"):
        run_id = _child_run(cfg, space, config, trial_id, setup["parent_run_id"], setup["tracking_uri"])
        if gate:
            from pipelines.tracking import RunTracker

            tracker = RunTracker.start("", "", {}, run_id=run_id, system_metrics=False, uri=setup["tracking_uri"])
            tracker.log_metrics(gate, 0)
            tracker.flush()
    stop_file = Path(cfg.run.storage_path) / trial_id / STOP_FILE
    try:
        train_driver(cfg, callbacks=(make_reporter(space, gate, stop_file),), mlflow_run_id=run_id)
    except Exception:
        if not stop_file.exists():
            raise
        # the scheduler's stop, carried out by aborting the Train run: the trial ends normally


# ----------------------------------------------------------------------------------------------
# on the search's driver


def _progress_callback(*args, **kwargs):
    from .progress import SearchProgress

    return SearchProgress(*args, **kwargs)


def _parent_run(search: SearchConfig, uri: str) -> Optional[str]:
    """The search's MLflow parent run: created once per experiment directory, reused on --resume."""
    if not search.base.run.tracking:
        return None
    from pipelines.tracking import RunTracker

    id_file = search.experiment_dir / PARENT_ID_FILE
    if id_file.exists():
        return id_file.read_text().strip()
    params = {"tune.space": search.space.name, "tune.objective": search.space.objective,
              "tune.search": search.search_kind, "tune.num_samples": search.num_samples,
              "tune.scheduler": search.scheduler, "tune.grace_period": search.grace_period,
              "tune.reduction_factor": search.reduction_factor, "tune.max_t": search.max_t,
              "tune.seed": search.seed, "tune.searched": json.dumps(sorted(search.space.params))}
    tracker = RunTracker.start(search.base.run.experiment, f"tune-{search.name or search.space.name}", params,
                               system_metrics=False, uri=uri, tags={"bitlm.tune.role": "search"})
    tracker.log_dict(search.space.to_dict(), "space.json")
    search.experiment_dir.mkdir(parents=True, exist_ok=True)
    id_file.write_text(tracker.run_id)
    return tracker.run_id


def check_data(base: PipelineConfig) -> None:
    """ValueError unless run.data is a prepared corpus (checked before Ray starts)."""
    if not base.run.data or not (Path(base.run.data) / "manifest.json").exists():
        raise ValueError(f"run.data: {base.run.data or '(empty)'} holds no manifest.json (write it with `bitlm prepare`)")


def _check_same_space(search: SearchConfig) -> None:
    """A resumed search keeps the space it started with (Tune restores its samplers, not ours)."""
    saved = search.experiment_dir / "space.json"
    if saved.exists() and json.loads(saved.read_text()) != search.space.to_dict():
        raise ValueError(f"tune: {search.experiment_dir} was started with another space "
                         f"({json.loads(saved.read_text()).get('name')}); resume it with the same --space")


def expected_trials(search: SearchConfig) -> int:
    """Trials the search makes in all: num_samples for random search, times the grid's size for grid search."""
    size = 1
    for value in to_tune(search.space, search.search, search.grid_points).values():
        if isinstance(value, dict) and "grid_search" in value:
            size *= len(value["grid_search"])
    return search.num_samples * size


def run_search(search: SearchConfig, *, resume: bool = False, echo: Callable[[str], None] = print):
    """Validate, build (or restore) and run the Tuner; write results.csv and best_config.json; returns a SearchOutcome.

    Ray must be initialised (run_search_cli connects); validation happens before any trial starts.
    """
    import ray
    from ray import tune

    from bitlm.cli.console import is_verbose
    from pipelines.tracking import tracking_uri

    from .report import write_outcome

    base = search.base
    validate(search.space, base)
    check_data(base)
    base = dataclasses.replace(base, run=dataclasses.replace(base.run, data=str(Path(base.run.data).resolve())))
    search = dataclasses.replace(search, base=base)
    exp_dir = search.experiment_dir
    demand = trial_demand(base, search.trial_cpus)
    k, line = concurrency(demand, ray.cluster_resources(), search.max_concurrent)
    echo(line)
    restorable = tune.Tuner.can_restore(str(exp_dir))
    if exp_dir.exists() and restorable and not resume:
        raise ValueError(f"tune: {exp_dir} holds a search already; pass --resume to continue it or choose another "
                         f"--name / --storage")
    if resume and not restorable:
        echo(f"nothing to resume in {exp_dir}: starting a new search")
    if resume and restorable:
        _check_same_space(search)
    exp_dir.mkdir(parents=True, exist_ok=True)
    (exp_dir / "space.json").write_text(json.dumps(search.space.to_dict(), indent=2) + "\n")
    uri = tracking_uri()
    parent_run_id = _parent_run(search, uri)
    setup = {"space": search.space.to_dict(), "base": to_dict(base), "runs_dir": str(exp_dir / "runs"),
             "n_probes": search.n_probes, "parent_run_id": parent_run_id, "tracking_uri": uri}
    # the driver's own share; its Train workers (and their GPUs) get their own placement group
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"cpu": search.trial_cpus})
    total = expected_trials(search)
    progress = _progress_callback(search.space, total, exp_dir, parent_run_id, uri, search.stop_after, echo)
    if resume and restorable:
        echo(f"resuming {exp_dir} (finished trials are kept, unfinished ones continue)")
        # the restored RunConfig holds the pickled progress callback (SearchProgress drops its stop rule
        # when pickled, so a restored session runs to the end)
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True)
    else:
        scheduler = make_scheduler(search.scheduler, exp_dir / "runs", search.grace_period, search.reduction_factor,
                               search.max_t)
        tuner = tune.Tuner(
            trainable, param_space=to_tune(search.space, search.search, search.grid_points),
            # max_concurrent_trials would be ignored with a search_alg: the generator takes the limit
            tune_config=tune.TuneConfig(metric=METRIC, mode="min", num_samples=search.num_samples,
                                        scheduler=scheduler, reuse_actors=True,
                                        search_alg=make_search_alg(search.seed, k, search.stop_after)),
            run_config=tune.RunConfig(name=exp_dir.name, storage_path=str(exp_dir.parent), callbacks=[progress],
                                      verbose=0))
    if not is_verbose():
        # the new output engine prints its configuration box and tables at every verbosity; the
        # legacy one is silent at verbose=0, leaving the console to SearchProgress
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    echo(f"search {search.space.name}: {total} trial(s), objective {search.space.objective} "
         f"({'ASHA' if search.scheduler == 'asha' else 'FIFO'}, {search.search_kind} search); {exp_dir}")
    grid = tuner.fit()
    return write_outcome(search, grid, total, parent_run_id, uri, echo)


def run_search_cli(search: SearchConfig, *, resume: bool = False, address: Optional[str] = None,
                   echo: Callable[[str], None] = print):
    """Validate the space (before Ray starts), connect to (or start) Ray, run the search; errors as click errors."""
    import click
    import ray

    from bitlm.cli.console import is_verbose

    try:
        validate(search.space, search.base)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--space") from None
    try:
        check_data(search.base)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--data") from None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        from pipelines.train import ray_address

        # "local" unless asked: a plain ray.init() would join any Ray already running on this machine
        address = ray_address(address)
        # trials' console lines would interleave with the progress view; --verbose shows them
        ray.init(address=address, log_to_driver=is_verbose(),
                 **({"dashboard_host": "127.0.0.1"} if address == "local" else {}))
    try:
        return run_search(search, resume=resume, echo=echo)
    except ValueError as err:
        raise click.ClickException(str(err)) from None


def main() -> None:
    """`python -m tune.search`: the options of `bitlm tune` (a `ray job submit` entry point)."""
    from bitlm.cli import console
    from bitlm.cli.tune import tune_command

    console.quiet()  # before Ray starts: its workers inherit the quiet environment
    tune_command(prog_name="python -m tune.search")


def best_config(search: SearchConfig, trial: dict[str, Any]) -> PipelineConfig:
    """The full config of a trial, as `bitlm train --config` takes it (run named after the search, not the trial)."""
    cfg = trial_config(search.space, search.base, trial, "x", Path(search.base.run.storage_path))
    name = f"{search.name or search.space.name}-best"
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=name, storage_path=search.base.run.storage_path))


if __name__ == "__main__":
    # the importable module's main, not this __main__ copy: Ray pickles run_trial by reference
    from tune.search import main as importable_main

    importable_main()
