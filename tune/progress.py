"""The search's console and MLflow bookkeeping on the driver: one line per trial event, child-run status.

Replaces Tune's status tables (RunConfig(verbose=0)). Each trial's evaluations print as one line
("[2/4] 00001 eval 3  step 60  objective 4.812  best 4.655"); a finished or stopped trial prints
its outcome. The objective (and the gate rates) go to the trial's MLflow child at the evaluation's
step; a trial ASHA stopped is tagged and its child marked KILLED (its process is gone).
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path
from typing import Any, Callable, Optional

from ray.tune import Callback

from .spaces import Space
from .stopping import STOP_FILE

STATUS_FILE = "tune_status"  # per trial, next to its Train run: "finished", "stopped early" or "error"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value).lower() if isinstance(value, bool) else str(value)


def trial_number(trial_id: str) -> int:
    """Tune's trial ids end in a running index (a1b2c_00003 -> 3)."""
    tail = trial_id.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class SearchProgress(Callback):
    """Prints a line per trial event and keeps the trials' MLflow child runs in step with Tune."""

    def __init__(self, space: Space, total: int, exp_dir: Path, parent_run_id: Optional[str], uri: str,
                 stop_after: Optional[int] = None, echo: Optional[Callable[[str], None]] = None):
        self.space, self.total, self.exp_dir = space, total, Path(exp_dir)
        self.parent_run_id, self.uri = parent_run_id, uri
        self.stop_after = stop_after
        self._echo = echo
        self._parent = None
        self._children: dict[str, Any] = {}
        self._completed_here = 0
        self.best: Optional[float] = None
        self.interrupted = False

    def __getstate__(self) -> dict[str, Any]:
        # pickled into the Tuner's state: no clients, no console, and no stop rule for a restored session
        state = dict(self.__dict__, _parent=None, _children={}, _echo=None, stop_after=None, _completed_here=0,
                     interrupted=False)
        return state

    def echo(self, line: str) -> None:
        (self._echo or print)(line)

    def _label(self, trial) -> str:
        return f"[{trial_number(trial.trial_id) + 1}/{self.total}] {trial.trial_id}"

    def _child(self, trial_id: str):
        """A tracker bound to the trial's child run (None until the trial has created it)."""
        if self.parent_run_id is None:
            return None
        if trial_id not in self._children:
            id_file = self.exp_dir / "runs" / trial_id / "mlflow_run_id"
            if not id_file.exists():
                return None
            from pipelines.tracking import RunTracker

            if self._parent is None:
                self._parent = RunTracker.start("", "", {}, run_id=self.parent_run_id, system_metrics=False,
                                                uri=self.uri)
            self._children[trial_id] = RunTracker(self._parent.client, id_file.read_text().strip(),
                                                  self._parent.experiment_id, self.uri)
        return self._children[trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        searched = "  ".join(f"{key}={_short(trial.config.get(key))}" for key in self.space.params)
        self.echo(f"{self._label(trial)} started  {searched}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get("objective")
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        self.best = value if self.best is None else min(self.best, value)
        extra = "".join(f"  {k.split('/')[-1]} {result[k]:.3f}" for k in ("val/K", "val/C", "val/S") if k in result)
        self.echo(f"{self._label(trial)} eval {result.get('training_iteration', '?')}  step {result.get('step', '?')}"
                  f"  objective {value:.4f}{extra}  best {self.best:.4f}")
        child = self._child(trial.trial_id)
        if child is not None:
            child.log_metrics({k: v for k, v in result.items() if k == "objective" or k.startswith("gate/")},
                              int(result.get("step", 0)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        stop_file = self.exp_dir / "runs" / trial.trial_id / STOP_FILE
        # the scheduler's stops are written there (tune.stopping); no file: the budget ran out
        stopped = stop_file.exists() and stop_file.read_text().startswith("stopped early")
        status = "stopped early" if stopped else "finished"
        n_evals = last.get("training_iteration", 0)
        self.echo(f"{self._label(trial)} {status} after {n_evals} eval(s)"
                  + (f"; objective {last['objective']:.4f}" if "objective" in last else ""))
        self._record(trial.trial_id, status)
        self._count_done()

    def _count_done(self) -> None:
        """A trial ended (finished, stopped or failed): the session ends after stop_after of them."""
        self._completed_here += 1
        if self.stop_after is not None and self._completed_here >= self.stop_after and not self.interrupted:
            self.interrupted = True
            self.echo(f"stopping after {self._completed_here} trial(s) as asked; continue with --resume")
            # the way Ctrl+C ends a Tune session: its state is saved and Tuner.restore continues it
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_trial_error(self, iteration, trials, trial, **info):
        where = getattr(trial, "error_file", None) or getattr(trial, "path", "")
        self.echo(f"{self._label(trial)} failed; see {where}")
        self._record(trial.trial_id, "error")
        self._count_done()  # the generator makes no more trials than stop_after this session: never wait on one

    def _record(self, trial_id: str, status: str) -> None:
        directory = self.exp_dir / "runs" / trial_id
        directory.mkdir(parents=True, exist_ok=True)
        (directory / STATUS_FILE).write_text(status + "\n")
        child = self._child(trial_id)
        if child is None:
            return
        child.client.set_tag(child.run_id, "bitlm.tune.status", status)
        child.flush()
        # a stopped trial's Train run was aborted (train_driver marked it FAILED): say what happened
        final = {"finished": "FINISHED", "stopped early": "KILLED"}.get(status, "FAILED")
        child.client.set_terminated(child.run_id, status=final)

    def on_experiment_end(self, trials, **info):
        for child in self._children.values():
            child.flush()
