"""The Tune studies on tinyshakespeare: one `bitlm tune` search, one JSON line per trial plus a summary line.

Prepares ../shared/data/tinyshakespeare.txt once (into runs/bench-tune/data, never the repo), runs
the search on a local Ray with MLflow in the local store, and appends the results table of the
search to --out. Run from benchmarks/, e.g.:

  python bench_tune_study.py --space representation --minutes-per-trial 3 --preset small --scheduler fifo
  python bench_tune_study.py --space diffusion --num-samples 8 --minutes-per-trial 1 --preset tiny --causal-baseline
  python bench_tune_study.py --space telemetry --num-samples 8 --minutes-per-trial 1 --preset tiny
  python bench_tune_study.py --space ../tune/examples/telemetry-lambda.json --scheduler fifo --preset tiny \
      --minutes-per-trial 10 --set train.max_steps=1500
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from common import SHAKESPEARE, emit

ROOT = Path(__file__).resolve().parents[1]
NUMERIC = ("objective", "val/bpb", "val/elbo_bpb", "val/K", "val/C", "val/S", "gate/false_block_rate",
           "gate/loop_miss_rate", "gate/random_miss_rate", "train_seconds", "n_evals", "step")


def prepare(work: Path) -> Path:
    data = work / "data"
    if not (data / "manifest.json").exists():
        subprocess.run([str(Path(sys.executable).parent / "bitlm"), "prepare", str(SHAKESPEARE), "--out", str(data)],
                       check=True)
    return data


def causal_baseline(data: Path, work: Path, preset: str, minutes: float) -> dict:
    """A causal model of the same size, budget and CPU share as a trial (the diffusion study's reference)."""
    out = work / f"causal-{preset}-{minutes:g}min"
    command = [str(Path(sys.executable).parent / "bitlm"), "train", "--data", str(data), "--out", str(out),
               "--preset", preset, "--minutes", str(minutes), "--workers", "1", "--set", "run.cpus_per_worker=1.5",
               "--set", "train.eval_every=100", "--set", "run.experiment=bitlm-tune", "--no-resume"]
    done = subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True).stdout
    return parse_baseline(done) | {"command": " ".join(command[1:])}


def parse_baseline(stdout: str) -> dict:
    """Steps and val bpb from `bitlm train`'s closing line ('done: step N; val bpb X; ...')."""
    line = next(text for text in stdout.splitlines() if text.startswith("done: step"))
    step, bpb = line.split(";")[0].split()[-1], line.split("val bpb ")[1].split(";")[0]
    return {"causal_steps": int(step), "causal_val_bpb": float(bpb)}


def rows(csv_path: Path) -> list[dict]:
    out = []
    with csv_path.open() as f:
        for row in csv.DictReader(f):
            for key in NUMERIC:
                if row.get(key) not in (None, ""):
                    row[key] = float(row[key])
            out.append(row)
    return out


def cells(space: str, table: list[dict]) -> list[dict]:
    """Mean and spread over seeds per cell of the searched values other than the seed."""
    groups = defaultdict(list)
    keys = [k for k in table[0] if k not in NUMERIC and k not in ("trial_id", "status", "mlflow_run_id", "train.seed")]
    for row in table:
        if isinstance(row.get("objective"), float):
            groups[tuple((k, row[k]) for k in keys)].append(row["objective"])
    return [{"bench": "tune", "space": space, "cell": dict(cell), "n": len(values),
             "objective_mean": round(statistics.fmean(values), 4),
             "objective_spread": round(max(values) - min(values), 4), "objectives": [round(v, 4) for v in values]}
            for cell, values in sorted(groups.items())]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", required=True)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--minutes-per-trial", type=float, default=3.0)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--scheduler", default="asha", choices=["asha", "fifo"])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-tune")
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--causal-baseline", action="store_true",
                        help="also train a causal model of the same preset and budget (for the diffusion study)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tune.jsonl")
    args = parser.parse_args(argv)

    data = prepare(args.work)
    space = str(Path(args.space).resolve()) if Path(args.space).is_file() else args.space
    name = f"{Path(args.space).stem}-{args.preset}-{args.minutes_per_trial:g}min-{int(time.time())}"
    command = [str(Path(sys.executable).parent / "bitlm"), "tune", "--space", space, "--data", str(data),
               "--num-samples", str(args.num_samples), "--minutes-per-trial", str(args.minutes_per_trial),
               "--preset", args.preset, "--scheduler", args.scheduler, "--storage", str(args.work / "tune"),
               "--name", name, "--trial-cpus", "0.5", "--set", "run.cpus_per_worker=1.5",
               "--set", "train.eval_every=100"]
    for item in args.sets:
        command += ["--set", item]
    start = time.time()
    subprocess.run(command, check=True, cwd=ROOT)
    table = rows(args.work / "tune" / name / "results.csv")
    base = {"bench": "tune", "space": args.space, "preset": args.preset, "minutes_per_trial": args.minutes_per_trial,
            "scheduler": args.scheduler, "experiment": name, "command": " ".join(command[1:])}
    for row in table:
        emit(base | {"trial": row}, args.out)
    for cell in cells(args.space, table):
        emit(base | cell, args.out)
    summary = {"summary": True, "n_trials": len(table), "seconds_total": round(time.time() - start, 1)}
    scored = [r for r in table if isinstance(r.get("objective"), float)]
    if scored:
        best = min(scored, key=lambda r: r["objective"])
        summary |= {"best_trial": best["trial_id"], "best_objective": round(best["objective"], 4)}
    if args.causal_baseline:
        summary |= causal_baseline(data, args.work, args.preset, args.minutes_per_trial)
    emit(base | summary, args.out)
    print(json.dumps({"results": str(args.out)}))


if __name__ == "__main__":
    main()
