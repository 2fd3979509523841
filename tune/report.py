"""A finished (or interrupted) search's results: results.csv, best_config.json, the plot, the MLflow parent."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .progress import STATUS_FILE, _short
from .spaces import sampler_of

_METRIC_COLUMNS = ("val/bpb", "val/elbo_bpb", "val/K", "val/C", "val/S", "gate/false_block_rate",
                   "gate/loop_miss_rate", "gate/random_miss_rate", "train_seconds")


@dataclass
class SearchOutcome:
    """What a search produced: one row per trial, the best trial and the files written."""

    rows: list[dict[str, Any]]
    best: Optional[dict[str, Any]]
    csv_path: Path
    best_config_path: Optional[Path]
    plot_path: Optional[Path]
    interrupted: bool
    parent_run_id: Optional[str]
    train_command: str = ""


def _finite(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def result_rows(search, grid) -> list[dict[str, Any]]:
    """One row per trial of a ResultGrid: id, outcome, evaluations, objective, searched values, metrics."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_dir = Path(result.path) if result.path else None
        trial_id = metrics.get("trial_id") or (trial_dir.name.split("_")[-2] + "_" + trial_dir.name.split("_")[-1]
                                               if trial_dir else "?")
        status_file = search.experiment_dir / "runs" / trial_id / STATUS_FILE
        status = "error" if result.error else (status_file.read_text().strip() if status_file.exists() else "unfinished")
        id_file = search.experiment_dir / "runs" / trial_id / "mlflow_run_id"
        row = {"trial_id": trial_id, "status": status, "n_evals": metrics.get("training_iteration", 0),
               "step": metrics.get("step", ""), "objective": _finite(metrics.get("objective"))}
        row |= {key: (result.config or {}).get(key) for key in search.space.params}
        row |= {key: metrics[key] for key in _METRIC_COLUMNS if key in metrics}
        row["mlflow_run_id"] = id_file.read_text().strip() if id_file.exists() else ""
        row["config"] = result.config or {}
        rows.append(row)
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns and k != "config"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})


def plot(space, rows: list[dict[str, Any]], path: Path) -> Optional[Path]:
    """The objective (last evaluation) against each searched parameter; hollow markers: stopped early."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r["objective"] is not None]
    if not scored:
        return None
    keys = list(space.params)
    n_cols = min(len(keys), 3)
    n_rows = math.ceil(len(keys) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.2 * n_cols, 3.2 * n_rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        kind, _ = sampler_of(key, space.params[key])
        values = [r[key] for r in scored]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            xs = [float(v) for v in values]
        else:
            labels = sorted({str(v) for v in values})
            xs = [labels.index(str(v)) for v in values]
            ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
        for x, row in zip(xs, scored):
            early = row["status"] != "finished"
            ax.scatter([x], [row["objective"]], s=36, facecolors="none" if early else "C0", edgecolors="C0")
        if numeric and kind in ("loguniform", "logint") and min(xs) > 0:
            ax.set_xscale("log")
        ax.set_xlabel(key, fontsize=9)
        ax.set_ylabel(f"objective ({space.objective})", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"search {space.name}: {len(scored)} trials (hollow: stopped early)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outcome(search, grid, total: int, parent_run_id: Optional[str], uri: str,
                  echo: Callable[[str], None]) -> SearchOutcome:
    """Write results.csv, best_config.json and the plot; finish the MLflow parent; print the best."""
    from bitlm.config import to_json

    from .search import best_config

    exp_dir = search.experiment_dir
    rows = result_rows(search, grid)
    csv_path = exp_dir / "results.csv"
    write_csv(rows, csv_path)
    done = [r for r in rows if r["status"] in ("finished", "stopped early", "error")]
    interrupted = len(done) < total
    scored = [r for r in rows if r["objective"] is not None and r["status"] in ("finished", "stopped early")]
    best = min(scored, key=lambda r: r["objective"]) if scored else None
    best_path = plot_path = None
    command = ""
    if best is not None:
        best_path = exp_dir / "best_config.json"
        best_path.write_text(to_json(best_config(search, best["config"])) + "\n")
        plot_path = plot(search.space, rows, exp_dir / "objective_vs_params.png")
        command = (f"bitlm train --config {best_path} --data {search.base.run.data} "
                   f"--out runs/{search.name or search.space.name}-best")
    if parent_run_id is not None:
        _finish_parent(parent_run_id, uri, rows, best, [p for p in (csv_path, best_path, plot_path) if p is not None],
                       interrupted)
    echo(f"{len(done)}/{total} trial(s) done ({sum(r['status'] == 'stopped early' for r in rows)} stopped early, "
         f"{sum(r['status'] == 'error' for r in rows)} failed); table {csv_path}")
    if interrupted:
        echo("the search stopped before its end; continue it with --resume (same --storage/--name)")
    if best is not None:
        searched = "  ".join(f"{k}={_short(best[k])}" for k in search.space.params)
        echo(f"best: trial {best['trial_id']} objective {best['objective']:.4f} ({search.space.objective})  {searched}")
        echo(f"train it: {command}")
    return SearchOutcome(rows=rows, best=best, csv_path=csv_path, best_config_path=best_path, plot_path=plot_path,
                         interrupted=interrupted, parent_run_id=parent_run_id, train_command=command)


def _finish_parent(parent_run_id: str, uri: str, rows: list[dict[str, Any]], best: Optional[dict[str, Any]],
                   artifacts: list[Path], interrupted: bool) -> None:
    from pipelines.tracking import RunTracker

    parent = RunTracker.start("", "", {}, run_id=parent_run_id, system_metrics=False, uri=uri)
    for path in artifacts:
        parent.client.log_artifact(parent_run_id, str(path))
    if best is not None:
        parent.log_metrics({"best/objective": best["objective"]}, 0)
        parent.client.set_tag(parent_run_id, "bitlm.tune.best_trial_id", best["trial_id"])
        if best["mlflow_run_id"]:
            parent.client.set_tag(parent_run_id, "bitlm.tune.best_run_id", best["mlflow_run_id"])
    for row in rows:  # a resumed search may have a new best: every child says whether it is the one
        if row["mlflow_run_id"]:
            parent.client.set_tag(row["mlflow_run_id"], "bitlm.tune.best", "true" if row is best else "false")
    parent.end("KILLED" if interrupted else "FINISHED")
