"""How a trial ends when Tune's scheduler stops it: a stop file that the trial's own Train controller acts on.

Tune's own stop kills the trial actor, and its Train workers' placement group stays reserved
until Train's cleaner notices (never, without the dashboard's state API), so the next trial waits
for CPUs that nobody uses. Here the scheduler writes `<runs>/<trial>/tune_stop`; the reporter
callback, which lives in the Train controller, sees it and aborts the run, which releases the
workers. Two private Ray names are relied on: `TrainController.abort` (through the current actor
handle) and `TuneReportCallback._training_actor_item_queue`, where the callback puts its results.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Literal

from .spaces import METRIC, Space, objective

STOP_FILE = "tune_stop"  # written by the scheduler: the trial's Train run aborts itself
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

    class GracefulASHA(_GracefulStop, ASHAScheduler):
        def __init__(self):
            ASHAScheduler.__init__(self, time_attr="training_iteration", grace_period=grace_period,
                                   reduction_factor=reduction_factor, max_t=max_t)
            self._runs_dir, self._max_evals = runs_dir, max_t

        def on_trial_result(self, tune_controller, trial, result):
            return self._graceful(trial, result, ASHAScheduler.on_trial_result(self, tune_controller, trial, result))

    class GracefulFIFO(_GracefulStop, FIFOScheduler):
        def __init__(self):
            FIFOScheduler.__init__(self)
            self._runs_dir, self._max_evals = runs_dir, max_t

        def on_trial_result(self, tune_controller, trial, result):
            return self._graceful(trial, result, "CONTINUE")

    return GracefulASHA() if kind == "asha" else GracefulFIFO()
