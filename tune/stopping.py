"""How a trial ends when Tune's scheduler stops it: a stop file that the trial's own Train controller acts on.

Tune's own stop kills the trial actor, and its Train workers' placement group stays reserved
until Train's cleaner notices (never, without the dashboard's state API), so the next trial waits
for CPUs that nobody uses. Here the scheduler writes `<runs>/<trial>/tune_stop`; the reporter
callback, which lives in the Train controller, sees it and aborts the run, which releases the
workers. Three private Ray names are relied on: `TrainController.abort` (through the current actor
handle), `TuneReportCallback._training_actor_item_queue`, where the callback puts its results, and
ASHA's `_Bracket._rungs`, which `asha_rungs.json` keeps across Tuner.restore.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Literal, Optional

from .spaces import METRIC, Space, objective

STOP_FILE = "tune_stop"  # written by the scheduler: the trial's Train run aborts itself
RUNGS_FILE = "asha_rungs.json"  # the scheduler's memory across Tuner.restore
# reported to Tune and logged to MLflow: the eval metrics, never Ray's bookkeeping (pid, hostname, ...)
_SCORES = ("val/bpb", "val/elbo_bpb")
Scheduler = Literal["asha", "fifo"]


def make_reporter(space: Space, gate: dict[str, float], stop_file: Path):
    """A TuneReportCallback that forwards evaluations only (eval metrics, `objective`, gate rates).

    It lives in the Train controller, and ends the run there when the scheduler asks for a stop
    (stop_file): an aborted controller removes its workers' placement group, while a trial
    killed by Tune leaves it reserved until Train's cleaner notices (not at all without the
    dashboard's state API), and the next trial waits for the CPUs.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class EvalReport(TuneReportCallback):
        _watching = False

        def after_report(self, run_context, metrics, checkpoint):
            if not self._watching:
                self._watching = True
                threading.Thread(target=_abort_when_asked, args=(stop_file,), daemon=True).start()
            first = metrics[0]
            # checkpoint and final reports repeat the last evaluation; scaling events carry no score
            if stop_file.exists() or "final" in first or "event" in first or not any(k in first for k in _SCORES):
                return
            value = objective(space, first, gate)
            if value is None:
                return
            kept = {k: v for k, v in first.items()
                    if (k.startswith(("val/", "train/")) or k in ("step", "train_seconds", "bytes_seen"))
                    and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
            self._training_actor_item_queue.put(kept | gate | {METRIC: value})

    return EvalReport()


def _abort_when_asked(stop_file: Path, poll_s: float = 0.25) -> None:
    """In the Train controller: abort this run (workers and placement group released) once stop_file appears."""
    import ray

    while not stop_file.exists():
        time.sleep(poll_s)
    ray.get_runtime_context().current_actor.abort.remote()


class _GracefulStop:
    """Scheduler mixin: a stop (early, or at max_t) becomes a stop file the trial's controller acts on.

    The trial then ends by itself (see _make_reporter) and Tune sees it finish; Tune's own stop
    would kill the trial actor and strand its Train workers' resources.
    """

    def _graceful(self, trial, result, action: str) -> str:
        stop_file = self._runs_dir / trial.trial_id / STOP_FILE
        if stop_file.exists():
            return "CONTINUE"
        iteration = int(result.get("training_iteration", 0))
        if action == "STOP" or iteration >= self._max_evals:
            stop_file.parent.mkdir(parents=True, exist_ok=True)
            status = "finished" if iteration >= self._max_evals else "stopped early"
            stop_file.write_text(f"{status} at eval {iteration}\n")
        return "CONTINUE"


def make_scheduler(kind: Scheduler, runs_dir: Path, grace_period: int, reduction_factor: int, max_t: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    (runs_dir / RUNGS_FILE).unlink(missing_ok=True)  # a new search: no rungs from an earlier one

    class GracefulASHA(_GracefulStop, ASHAScheduler):
        """ASHA whose rungs survive Tuner.restore (Tune restores trials and the searcher, not the scheduler)."""

        def __init__(self):
            ASHAScheduler.__init__(self, time_attr="training_iteration", grace_period=grace_period,
                                   reduction_factor=reduction_factor, max_t=max_t)
            self._runs_dir, self._max_evals = runs_dir, max_t

        def on_trial_result(self, tune_controller, trial, result):
            action = ASHAScheduler.on_trial_result(self, tune_controller, trial, result)
            save_rungs(self._brackets, self._runs_dir / RUNGS_FILE)
            return self._graceful(trial, result, action)

        def on_trial_complete(self, tune_controller, trial, result):
            ASHAScheduler.on_trial_complete(self, tune_controller, trial, result)
            save_rungs(self._brackets, self._runs_dir / RUNGS_FILE)

        def __setstate__(self, state):
            # Tuner.restore unpickles the scheduler as it was when the search began: put back what the
            # finished trials recorded, or a resumed search's first new trial always passes every rung
            self.__dict__.update(state)
            load_rungs(self._brackets, self._runs_dir / RUNGS_FILE)

    class GracefulFIFO(_GracefulStop, FIFOScheduler):
        def __init__(self):
            FIFOScheduler.__init__(self)
            self._runs_dir, self._max_evals = runs_dir, max_t

        def on_trial_result(self, tune_controller, trial, result):
            return self._graceful(trial, result, "CONTINUE")

    return GracefulASHA() if kind == "asha" else GracefulFIFO()


def make_search_alg(seed: int, max_concurrent: int, session_cap: Optional[int] = None):
    """Tune's random/grid generator, creating at most `session_cap` trials in this session (--stop-after N).

    Without the cap, the slot a finishing trial frees gets a new trial that the stop then interrupts
    while it starts: Tune waits 10 s for it and its start-up is lost. The cap is dropped from the
    pickled Tuner and from the searcher's saved state, so a restored session creates the rest.
    """
    from ray.tune.search.basic_variant import BasicVariantGenerator

    class SessionCappedGenerator(BasicVariantGenerator):
        def __init__(self):
            BasicVariantGenerator.__init__(self, random_state=seed, max_concurrent=max_concurrent)
            self._session_cap, self._created_here = session_cap, 0

        def next_trial(self):
            if self._session_cap is not None and self._created_here >= self._session_cap:
                return None
            trial = BasicVariantGenerator.next_trial(self)
            self._created_here += trial is not None
            return trial

        def get_state(self):
            state = BasicVariantGenerator.get_state(self)
            return state and dict(state, _session_cap=None, _created_here=0)

        def __getstate__(self):
            return dict(self.__dict__, _session_cap=None, _created_here=0)

    return SessionCappedGenerator()


def save_rungs(brackets, path: Path) -> None:
    """Each ASHA bracket's rungs (milestone, {trial id: signed score}) as JSON (Ray's private _Bracket._rungs)."""
    data = [[[milestone, recorded] for milestone, recorded in bracket._rungs] for bracket in brackets]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def load_rungs(brackets, path: Path) -> None:
    """Merge the saved rungs into fresh brackets of the same shape (nothing saved, or another shape: left as is)."""
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    if len(saved) != len(brackets):
        return
    for bracket, rungs in zip(brackets, saved):
        if [m for m, _ in rungs] != [m for m, _ in bracket._rungs]:
            continue
        for (_, recorded), (_, saved_recorded) in zip(bracket._rungs, rungs):
            recorded.update(saved_recorded)
