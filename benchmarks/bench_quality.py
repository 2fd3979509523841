"""Quality at equal wall-clock: the flat and patched bit models and the byte baseline on tinyshakespeare.

Each model trains for --minutes of optimizer time (evaluation pauses excluded) on the first 90%
of the file and is scored on the whole last 10% in bits per byte, next to gzip -9 and xz -9e
on the same validation bytes. Learning curves (val bpb vs training seconds) go to a JSON file
and a PNG; --save keeps each trained model. Two races can run side by side with --threads 1 and
their curve files be drawn as one figure afterwards:

    python bench_quality.py --models byte --threads 1 --curves results/curves_byte.json &
    python bench_quality.py --models patched --threads 1 --curves results/curves_patched.json
    python bench_quality.py --merge results/curves_byte.json results/curves_patched.json

--steps N trains every model for N optimizer steps instead (the schedule then follows steps): a
fixed-time race measures quality per second and carries the step count's run-to-run noise, a
fixed-step one measures quality per step, whatever each step cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from bitlm.baselines import compressor_bpb
from bitlm.config import ExperimentConfig, TrainConfig, apply_overrides
from bitlm.data import Corpus
from bitlm.checkpoint import save_pretrained
from bitlm.engine import fit
from bitlm.model import BitTransformerLM
from bitlm.objective import evaluate_bpb

from common import CONTENDERS, contender_config, emit, load_shakespeare

# optimizer steps between evaluations in a 10-minute run (~12 points per curve); scaled with --minutes
EVAL_EVERY_10_MIN = {"byte": 700, "patched": 450, "flat": 80}


def race(name: str, corpus: Corpus, args) -> dict:
    model_cfg = apply_overrides(contender_config(name, args.preset, args.context_bytes), args.set_model.get(name, []))
    if args.steps:  # the same steps for every model: the schedule follows steps, the curve ~12 points
        budget = {"max_steps": args.steps, "max_seconds": None, "eval_every": max(10, args.steps // 12)}
    else:
        budget = {"max_steps": 10_000_000, "max_seconds": args.minutes * 60,
                  "eval_every": max(10, int(EVAL_EVERY_10_MIN[name] * args.minutes / 10))}
    train_cfg = TrainConfig(batch_size=args.batch_size, context_bytes=args.context_bytes, lr=args.lr,
                            warmup_steps=args.warmup_steps, eval_batches=10, log_every=100, seed=0, **budget)
    exp = apply_overrides(ExperimentConfig(model=model_cfg, train=train_cfg), args.set)  # a recipe (bench_recipe.py)
    model_cfg, train_cfg = exp.model, exp.train
    torch.manual_seed(0)
    model = BitTransformerLM(model_cfg)
    logs = []
    result = fit(model, corpus, exp, report=lambda m, c: logs.append(m) if "bytes_per_s" in m else None)
    final = evaluate_bpb(model, corpus.val.sequential_batches(64, args.context_bytes))
    if args.save is not None:
        save_pretrained(model, args.save / name)
    bytes_per_s = [m["bytes_per_s"] for m in logs[1:]] or [logs[-1]["bytes_per_s"]]
    return {"model": name, "params": model.num_parameters(), "steps": result.step,
            "train_seconds": result.train_seconds, "val_bpb": final["bpb"], "val_bytes_scored": final["n_bytes"],
            "train_bytes_per_s": sum(bytes_per_s) / len(bytes_per_s),
            "curve": [(h["train_seconds"], h["val/bpb"]) for h in result.history],
            "model_config": dataclasses.asdict(model_cfg), "train_config": dataclasses.asdict(train_cfg)}


def plot(results: list[dict], refs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        xs, ys = zip(*r["curve"])
        ax.plot(xs, ys, marker="o", ms=3, label=f"{r['model']} ({r['params'] / 1e6:.2f}M params)")
    for name, value in refs.items():
        ax.axhline(value, ls="--", lw=1, color="grey")
        ax.text(0, value, f" {name}", va="bottom", fontsize=8, color="grey")
    ax.set_xlabel("training seconds (2-core CPU)")
    ax.set_ylabel("validation bits per byte (10-batch estimate)")
    ax.set_ylim(1.5, 9.5)
    ax.legend()
    ax.set_title("tinyshakespeare: bits per byte at equal wall-clock")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--steps", type=int, help="train every model for this many optimizer steps instead of "
                        "--minutes (equal steps: per-step quality, without the run-to-run noise of a time budget)")
    parser.add_argument("--models", default=",".join(CONTENDERS))
    parser.add_argument("--set-model", action="append", default=[], metavar="MODEL:KEY=VALUE",
                        help="a ModelConfig override for one contender, e.g. patched:local_d_ff=512")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a dotted experiment override for every contender, e.g. train.optimizer=muon")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context-bytes", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 to race side by side")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--curves", type=Path, default=Path("results/quality_curves.json"))
    parser.add_argument("--save", type=Path, metavar="DIR", help="save each trained model to DIR/<model>")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="draw these curve files (of earlier races) as one --curves file and PNG, and exit")
    args = parser.parse_args()
    if args.merge:
        merged = [r for path in args.merge for r in json.loads(path.read_text())]
        refs = compressor_bpb(Corpus.from_bytes(load_shakespeare(), window_bytes=1024, val_fraction=0.1).val
                              .to_numpy().tobytes())
        args.curves.write_text(json.dumps(merged, indent=1))
        plot(merged, {"gzip -9": refs["gzip-9"], "xz -9e": refs["xz-9e"]}, args.curves.with_suffix(".png"))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    per_model: dict[str, list[str]] = {}
    for item in args.set_model:
        name, kv = item.split(":", 1)
        per_model.setdefault(name, []).append(kv)
    args.set_model = per_model
    corpus = Corpus.from_bytes(load_shakespeare(), window_bytes=1024, val_fraction=0.1)
    val_bytes = corpus.val.to_numpy().tobytes()
    refs = compressor_bpb(val_bytes)
    emit({"bench": "compressors_on_val", "n_bytes": len(val_bytes)} | refs, args.out)
    results = []
    for name in args.models.split(","):
        r = race(name, corpus, args)
        results.append(r)
        emit({"bench": "quality_race", "minutes": None if args.steps else args.minutes, "fixed_steps": args.steps,
              "preset": args.preset,
              "context_bytes": args.context_bytes, "batch_size": args.batch_size,
              "sets": args.set, "model_sets": args.set_model.get(name, [])}
             | {k: v for k, v in r.items() if k not in ("curve", "model_config", "train_config")}, args.out)
    args.curves.parent.mkdir(parents=True, exist_ok=True)
    args.curves.write_text(json.dumps(results, indent=1))
    plot(results, {"gzip -9": refs["gzip-9"], "xz -9e": refs["xz-9e"]}, args.curves.with_suffix(".png"))


if __name__ == "__main__":
    main()
