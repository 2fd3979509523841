"""What reaches the console: our lines, real warnings and errors; framework chatter only with --verbose.

Ray, Ray Serve and MLflow each print start-up and bookkeeping lines at INFO (and a few at WARNING
or E-level that need no action on a local run). A run's console should show the run. Set
`BITLM_VERBOSE=1` (or pass `bitlm --verbose`) to see everything as the frameworks print it.

Three channels are quieted, each where it starts:
  - environment defaults read by the processes a local Ray starts (they inherit ours);
  - Python loggers of this (driver) process;
  - the worker and raylet lines Ray forwards to the driver (log_to_driver), filtered line by line.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from typing import Any, Iterable

VERBOSE_ENV = "BITLM_VERBOSE"

# Read by processes started after this one sets them (a local Ray's workers and actors inherit the
# driver's environment); an explicit setting by the user always wins (setdefault).
_QUIET_ENV = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # "Creating initial MLflow database tables..." and friends
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # a bar per artifact download of a few KB
    # Ray Train's preemption watcher exists for spot clusters; on a local head it only logs an
    # E-level "constructor arguments in the object store" line from core_worker.cc at start-up.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}

# Forwarded lines that carry no information for the user of a run.
_NOISE = [re.compile(p) for p in (
    r"^(INFO|DEBUG) \d{4}-\d\d-\d\d [\d:,]+ ",  # Ray Serve controller / proxy / replica INFO
    r"^\d{4}/\d\d/\d\d [\d:]+ (INFO|DEBUG) (mlflow|alembic)",  # MLflow INFO in workers
    r"^INFO [\w.]+\.py:\d+ -- ",  # Ray's own INFO lines from workers
    r"PreemptionWatcher",
    r"Task ServeController\.graceful_shutdown failed",  # the controller ends itself inside this task
)]

# Driver-side log records that need no action on a run we start ourselves.
_DRIVER_NOISE = (
    "Token authentication is enabled for this Ray cluster",  # local instance, token kept in ~/.ray
    "Generated new authentication token",
    "Started a local Ray instance",  # our own lines say where the run goes
)


def is_verbose() -> bool:
    """True when the user asked for the frameworks' full output (BITLM_VERBOSE set and not 0/false)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def is_noise(line: str) -> bool:
    """True for a forwarded framework line that is hidden unless verbose."""
    return any(p.search(line) for p in _NOISE)


class _DriverNoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _DRIVER_NOISE)


class _BelowWarningFilter(logging.Filter):
    """Drops INFO/DEBUG records; a filter, because Serve resets its logger's level when it starts."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def quiet() -> None:
    """Quiet Ray, Serve and MLflow for this process and the local Ray it may start (no-op when verbose).

    Call before Ray starts; safe to call more than once.
    """
    if is_verbose():
        return
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in ("mlflow", "alembic", "ray.serve", "ray.train", "ray.tune", "ray.data"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        if not any(isinstance(f, _BelowWarningFilter) for f in logger.filters):
            logger.addFilter(_BelowWarningFilter())
    _filter_driver_records()
    _filter_forwarded_lines()


def _filter_driver_records() -> None:
    """Drop the known-noise records of the 'ray' logger (a filter on it and on its handlers, set now and at init)."""
    ray_logger = logging.getLogger("ray")
    if not any(isinstance(f, _DriverNoiseFilter) for f in ray_logger.filters):
        ray_logger.addFilter(_DriverNoiseFilter())
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        return
    # ray.init replaces the 'ray' logger's handler (setup_logger); records from its child loggers
    # reach that handler without passing the parent logger's filters, so the handler gets one too.
    setup = getattr(ray_worker, "setup_logger", None)
    if setup is None or getattr(setup, "_bitlm_quiet", False):
        return

    @functools.wraps(setup)
    def setup_then_filter(*args: Any, **kwargs: Any) -> Any:
        result = setup(*args, **kwargs)
        for handler in logging.getLogger("ray").handlers:
            if not any(isinstance(f, _DriverNoiseFilter) for f in handler.filters):
                handler.addFilter(_DriverNoiseFilter())
        return result

    setup_then_filter._bitlm_quiet = True  # type: ignore[attr-defined]
    ray_worker.setup_logger = setup_then_filter
    for handler in ray_logger.handlers:
        handler.addFilter(_DriverNoiseFilter())


def _filter_forwarded_lines() -> None:
    """Wrap the function ray.init hands the forwarded worker lines to, so known noise is dropped.

    Ray exposes no public filter for log_to_driver output (2.60); `print_to_stdstream` is looked up
    when ray.init registers its handler, so wrapping it before init is enough. Absent (another Ray
    layout), nothing is filtered and the output is Ray's own.
    """
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        return
    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "_bitlm_quiet", False):
        return

    @functools.wraps(printer)
    def print_without_noise(data: dict, *args: Any, **kwargs: Any) -> Any:
        lines = data.get("lines")
        if isinstance(lines, list):
            kept = drop_noise(lines)
            if not kept:
                return None
            data = dict(data, lines=kept)
        return printer(data, *args, **kwargs)

    print_without_noise._bitlm_quiet = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = print_without_noise


def drop_noise(lines: Iterable[str]) -> list[str]:
    """The lines that are not framework noise."""
    return [line for line in lines if not is_noise(line)]
