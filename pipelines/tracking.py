"""MLflow tracking for training runs: the store's URI, a rank-0 run tracker, and the pyfunc model.

The one module in the repo that imports mlflow. Everything goes through an `MlflowClient` bound to
one run id, so a long-lived Ray worker never depends on MLflow's process-global active run; only
`log_model` sets the process-wide tracking URI, because `mlflow.models.Model.log` resolves it.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import queue
import tempfile
import threading
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking.context.registry import resolve_tags
from mlflow.types import ParamSchema, ParamSpec

from bitlm.store import default_tracking_uri as tracking_uri  # re-exported: the store runs log to

logger = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
_PARAMS_PER_BATCH = 100  # log_batch accepts at most 100 params / 100 tags / 1000 metrics per call
_METRICS_PER_BATCH = 1000
EVENT_TAG_PREFIX = "scaling.event."

# The pyfunc is logged "from code": MLflow stores this file instead of a pickled Python object, and
# the weights stay in the save_pretrained directory (safetensors), so loading never unpickles.
_MODEL_CODE = '''"""MLflow models-from-code entry point for a bitlm model (weights: artifacts["model"])."""
import mlflow

from pipelines.tracking import BitLMPyfunc

mlflow.models.set_model(BitLMPyfunc())
'''


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts to dotted keys; values as strings (JSON for lists/None), cut to MAX_PARAM_CHARS."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        flat[name] = text[:MAX_PARAM_CHARS]
    return flat


def _as_finite(value: Any) -> Optional[float]:
    """A float for a finite real number (Python, NumPy or 0-d tensor), else None."""
    if isinstance(value, (str, bytes, bool)):
        return None
    if not isinstance(value, numbers.Real) and not hasattr(type(value), "__float__"):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):  # e.g. a tensor with more than one element
        return None
    return number if math.isfinite(number) else None


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class _MetricWriter:
    """Writes metric batches in order on one background thread; `flush` returns once all are written.

    Why not MLflow's own asynchronous logging: its writer waits on its queue with a 1 s timeout and
    every flush (and set_terminated) joins that thread, so each flush costs 1 s, twice per Ray Train
    run. Its buffered mode flushes at once but holds writes back for a second, and a trial that Tune
    stops (its workers killed) then lost its last evaluation. Here a batch is written as soon as it
    is queued, and a flush only waits for the queue to drain.
    """

    def __init__(self, client: MlflowClient, run_id: str):
        self._queue: queue.Queue = queue.Queue()
        self._failed = False
        threading.Thread(target=self._write_forever, args=(client, run_id), name="bitlm-mlflow-writer",
                         daemon=True).start()

    def put(self, metrics: list) -> None:
        self._queue.put(metrics)

    def flush(self) -> None:
        self._queue.join()

    def _write_forever(self, client: MlflowClient, run_id: str) -> None:
        while True:
            batch = self._queue.get()
            try:
                client.log_batch(run_id, metrics=batch)
            except Exception as err:  # a lost write must not stop training; say so once
                if not self._failed:
                    logger.warning("run %s: writing metrics to MLflow failed (%s); later writes are tried", run_id, err)
                self._failed = True
            finally:
                self._queue.task_done()


class RunTracker:
    """One MLflow run, written by rank 0 of a training run; `start` creates or resumes it."""

    def __init__(self, client: MlflowClient, run_id: str, experiment_id: str, uri: str,
                 monitor: Optional[SystemMetricsMonitor] = None):
        self.client = client
        self._run_id = run_id
        self.experiment_id = experiment_id
        self.tracking_uri = uri
        self._monitor = monitor
        self._event_counts: dict[str, int] = {}
        self._n_events = 0
        self._writer: Optional[_MetricWriter] = None
        self._restore_event_counts()

    @classmethod
    def start(cls, experiment: str, run_name: str, params: dict, tags: Optional[dict] = None,
              run_id: Optional[str] = None, system_metrics: bool = True,
              uri: Optional[str] = None) -> "RunTracker":
        """Create (or get) `experiment`, start a run in it or resume `run_id`, and log `params`.

        A resumed run (a restarted Ray worker) keeps its id, metric history and event count; params
        it already holds are not logged again (MLflow params cannot change). `system_metrics`
        samples CPU/memory/disk/network (and GPU) every 10 s as `system/...` metrics. `uri`
        defaults to `tracking_uri()`.
        """
        uri = uri or tracking_uri()
        client = MlflowClient(tracking_uri=uri)
        tags = {k: str(v) for k, v in (tags or {}).items()}
        if run_id is None:
            experiment_id = _experiment_id(client, experiment)
            run = client.create_run(experiment_id, run_name=run_name, tags=resolve_tags(tags))
            run_id, resumed = run.info.run_id, False
            existing: dict[str, str] = {}
        else:
            run = client.get_run(run_id)
            experiment_id, resumed = run.info.experiment_id, True
            client.update_run(run_id, status="RUNNING")
            existing = run.data.params
            if tags:
                client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        flat = flatten_params(params)
        changed = sorted(k for k in flat.keys() & existing.keys() if flat[k] != existing[k])
        if changed:
            logger.warning("run %s: params %s differ from the logged values; keeping the logged ones",
                           run_id, changed)
        fresh = [Param(k, v) for k, v in flat.items() if k not in existing]
        for batch in _chunks(fresh, _PARAMS_PER_BATCH):
            client.log_batch(run_id, params=batch)
        monitor = None
        if system_metrics:
            monitor = SystemMetricsMonitor(run_id, resume_logging=resumed, tracking_uri=uri)
            monitor.start()
        return cls(client, run_id, experiment_id, uri, monitor)

    @property
    def run_id(self) -> str:
        return self._run_id

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> dict[str, float]:
        """Log the finite numeric values at `step` (names may contain '/'); returns what was logged."""
        finite = {k: v for k, v in ((k, _as_finite(v)) for k, v in metrics.items()) if v is not None}
        timestamp = int(time.time() * 1000)
        entries = [Metric(k, v, timestamp, step) for k, v in finite.items()]
        if entries and self._writer is None:
            self._writer = _MetricWriter(self.client, self._run_id)
        for batch in _chunks(entries, _METRICS_PER_BATCH):
            # asynchronous: the SQLite write happens on the writer thread, off the training step
            # (a synchronous write per log step cost 11% of 1-worker throughput; BENCHMARKS.md)
            self._writer.put(batch)
        return finite

    def log_event(self, kind: str, step: int, **details: Any) -> int:
        """Record a progressive-scaling expansion; returns the running count of all expansions.

        Metrics at `step`: `scaling/expansions` (all kinds) and `scaling/<kind>` (this kind's
        count); tag `scaling.event.<n>` holds JSON {kind, step, details}.
        """
        self._n_events += 1
        self._event_counts[kind] = self._event_counts.get(kind, 0) + 1
        self.log_metrics({"scaling/expansions": self._n_events, f"scaling/{kind}": self._event_counts[kind]},
                         step)
        event = json.dumps({"kind": kind, "step": step, "details": details}, sort_keys=True, default=str)
        self.client.set_tag(self._run_id, f"{EVENT_TAG_PREFIX}{self._n_events}", event)
        return self._n_events

    def log_dict(self, data: Any, artifact_file: str) -> None:
        """Store `data` as a JSON (or YAML, by extension) artifact of the run, e.g. metrics.json."""
        self.client.log_dict(self._run_id, data, artifact_file)

    def log_model(self, model_dir: str | Path, *, name: str = "model", registered_name: Optional[str] = None,
                  alias: Optional[str] = None) -> str:
        """Log a save_pretrained directory as a pyfunc model of this run; returns its `models:/m-...` URI.

        With `registered_name` a registry version is created too, and `alias` points
        `models:/<registered_name>@<alias>` at it. Loading needs this repository installed (the
        model's code is `from pipelines.tracking import BitLMPyfunc`).
        """
        from bitlm.checkpoint import read_config

        if alias is not None and registered_name is None:
            raise ValueError("alias needs registered_name (aliases belong to registered models)")
        read_config(model_dir)  # fails early, naming the file, on a directory that is not a model
        mlflow.set_tracking_uri(self.tracking_uri)
        params = self.client.get_run(self._run_id).data.params
        logged = mlflow.initialize_logged_model(name=name, source_run_id=self._run_id, params=params,
                                                model_type="bitlm", experiment_id=self.experiment_id)
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            # an input example would make MLflow load the model and generate once while logging
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            code = Path(tmp) / "bitlm_pyfunc.py"
            code.write_text(_MODEL_CODE)
            info = Model.log(artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=self._run_id,
                             model_id=logged.model_id, python_model=str(code),
                             artifacts={"model": str(Path(model_dir).resolve())}, signature=_signature(),
                             pip_requirements=_pip_requirements(), registered_model_name=registered_name)
        if alias is not None:
            self.client.set_registered_model_alias(registered_name, alias, str(info.registered_model_version))
        return info.model_uri

    def flush(self) -> None:
        """Wait until every metric logged so far is written."""
        if self._writer is not None:
            self._writer.flush()

    def detach(self) -> None:
        """Flush, stop system metrics, and leave the run open (a worker hands the run back to the driver)."""
        self.flush()
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None

    def end(self, status: str = "FINISHED") -> None:
        """Stop system metrics and mark the run FINISHED (or FAILED / KILLED)."""
        self.flush()
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        self.client.set_terminated(self._run_id, status=status)

    def __enter__(self) -> "RunTracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FINISHED" if exc_type is None else "FAILED")

    def _restore_event_counts(self) -> None:
        """Continue the event numbering of a resumed run from its scaling.event.* tags."""
        tags = self.client.get_run(self._run_id).data.tags
        for key, value in tags.items():
            if key.startswith(EVENT_TAG_PREFIX):
                kind = json.loads(value)["kind"]
                self._event_counts[kind] = self._event_counts.get(kind, 0) + 1
                self._n_events += 1


def _experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created if missing (tolerating a concurrent creator)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _signature() -> ModelSignature:
    """Only the params (so `predict(..., params=...)` reaches the model); inputs take three shapes."""
    specs = [ParamSpec(k, "long" if isinstance(v, int) else "double", v) for k, v in BitLMPyfunc.DEFAULTS.items()]
    return ModelSignature(params=ParamSchema(specs))


def _pip_requirements() -> list[str]:
    """Third-party packages the pyfunc imports, pinned to this environment (so MLflow infers nothing).

    bitlm itself is left out: it is installed from this repository (`pip install -e .`), and a
    requirement by name would let an environment restorer fetch an unrelated package from PyPI.
    """
    pins = []
    for package in ("mlflow", "torch", "safetensors", "numpy", "pandas"):
        try:
            pins.append(f"{package}=={metadata.version(package).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pins.append(package)
    return pins


class BitLMPyfunc(mlflow.pyfunc.PythonModel):
    """A bitlm model behind MLflow's pyfunc interface: prompts in, generated texts out."""

    DEFAULTS = {"max_new_bytes": 64, "temperature": 0.8, "seed": 0}
    # predict takes a DataFrame, a list of strings or a string, which MLflow's type-hint schemas
    # cannot express; this opts out of its hint check (and of the warning about missing hints)
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        import torch

        from bitlm.checkpoint import from_pretrained

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = from_pretrained(context.artifacts["model"], device=device)

    def predict(self, context, model_input, params=None):
        """Generate a continuation per prompt; returns prompt + continuation texts, in input order.

        `model_input` is a DataFrame with a `prompt` column (optional per-row columns
        `max_new_bytes`, `temperature`, `seed`), a list of strings, or one string. `params` sets
        call-wide values for the same three names; defaults: 64 bytes, temperature 0.8, seed 0.
        """
        from bitlm.sampling import generate

        base = {**self.DEFAULTS, **{k: v for k, v in (params or {}).items() if k in self.DEFAULTS}}
        texts = []
        for request in _requests(model_input, base):
            texts.append(generate(self.model, request["prompt"], int(request["max_new_bytes"]),
                                  temperature=float(request["temperature"]), seed=int(request["seed"])).text)
        return texts


def _requests(model_input: Any, base: dict[str, Any]) -> list[dict[str, Any]]:
    """One settings dict per prompt, from a DataFrame, a list of strings or a string."""
    if isinstance(model_input, str):
        return [{**base, "prompt": model_input}]
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):  # a pandas DataFrame
        if "prompt" not in model_input.columns:
            raise ValueError(f"model_input: a DataFrame needs a 'prompt' column, got {list(model_input.columns)}")
        rows = model_input.to_dict(orient="records")
        return [{**base, **{k: v for k, v in row.items() if k in base and _present(v)}, "prompt": row["prompt"]}
                for row in rows]
    if isinstance(model_input, (list, tuple)) and all(isinstance(p, str) for p in model_input):
        return [{**base, "prompt": p} for p in model_input]
    raise TypeError(f"model_input: expected a DataFrame with a 'prompt' column, a list of strings or a string, "
                    f"got {type(model_input).__name__}")


def _present(value: Any) -> bool:
    """False for the None/NaN a DataFrame puts in a row that left an optional column empty."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))
