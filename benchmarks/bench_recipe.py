"""Recipe search: each training-recipe option ablated on its own, then the winners combined, equally for
the byte baseline and the patched bit model.

Protocol: a preset (default `small`), a fixed wall-clock budget of optimizer time per run, the same
seed(s), data order and validation bytes for every variant; every run is its own process with one
torch thread, and --jobs runs go side by side (one per core), so a variant never gets more CPU than
its neighbour. The score is bits per byte on the first --val-bytes of the validation split (the last
10% of tinyshakespeare) at the run's context. One JSON line per run goes to --out; the table at the
end gives each variant's bpb and its change against the baseline of the same model, in percent.

    cd benchmarks && python bench_recipe.py --seconds 90 --jobs 2 --out results/recipe.jsonl
    python bench_recipe.py --table results/recipe.jsonl      # the table of an earlier search
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
from pathlib import Path

# name -> dotted overrides of the ExperimentConfig (the keys `bitlm train --set` takes)
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "muon": ["train.optimizer=muon"],
    "rmsnorm": ["model.norm=rms"],
    "rotary": ["model.position_encoding=rotary"],
    "relu2": ["model.mlp=relu2"],
    "swiglu": ["model.mlp=swiglu"],
    "qk_norm": ["model.qk_norm=true"],
    "zero_init": ["model.zero_init_residual=true", "model.zero_init_head=true"],
    "wsd": ["train.schedule=wsd"],
    "input_conv": ["model.input_conv=4"],
    "batch32": ["train.batch_size=32"],
    "context128": ["train.context_bytes=128"],
    "lr1e-3": ["train.lr=1e-3"],
}
MODELS = ("byte", "patched")


def run_one(model: str, overrides: list[str], seed: int, args) -> dict:
    """Train one variant in this process and score it (called in the child process)."""
    import torch

    torch.set_num_threads(1)
    from bitlm.config import ExperimentConfig, TrainConfig, apply_overrides
    from bitlm.data import Corpus
    from bitlm.engine import fit
    from bitlm.model import BitTransformerLM
    from bitlm.objective import evaluate_bpb

    from common import contender_config, load_shakespeare

    train = TrainConfig(batch_size=16, context_bytes=64, lr=3e-3, max_steps=10_000_000,
                        max_seconds=args.seconds, warmup_steps=100, eval_every=10_000_000, eval_batches=1,
                        log_every=100, seed=seed)
    # the position table is sized to the variant's context (the last assignment of train.context_bytes wins)
    context = ([int(o.split("=", 1)[1]) for o in overrides if o.startswith("train.context_bytes=")] or [64])[-1]
    cfg = apply_overrides(ExperimentConfig(model=contender_config(model, args.preset, context), train=train),
                          overrides)
    corpus = Corpus.from_bytes(load_shakespeare(), window_bytes=1024, val_fraction=0.1)
    torch.manual_seed(seed)
    net = BitTransformerLM(cfg.model)
    logs: list[dict] = []
    result = fit(net, corpus, cfg, report=lambda m, c: logs.append(m) if "bytes_per_s" in m else None)
    n_batches = max(1, args.val_bytes // (64 * context))
    score = evaluate_bpb(net, corpus.val.sequential_batches(64, context, max_batches=n_batches))
    rates = [m["bytes_per_s"] for m in logs[1:]] or [logs[-1]["bytes_per_s"]]
    return {"val_bpb": score["bpb"], "val_bytes_scored": score["n_bytes"], "steps": result.step,
            "train_seconds": result.train_seconds, "train_bytes_per_s": sum(rates) / len(rates),
            "params": net.num_parameters()}


def launch(model: str, variant: str, overrides: list[str], seed: int, args) -> dict:
    """Run one variant in a fresh single-threaded process; its JSON result, or the error it ended with."""
    cmd = [sys.executable, __file__, "--child", json.dumps([model, overrides, seed]), "--seconds", str(args.seconds),
           "--preset", args.preset, "--val-bytes", str(args.val_bytes)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parent)
    record = {"bench": "recipe", "model": model, "variant": variant, "overrides": overrides, "seed": seed,
              "preset": args.preset, "seconds": args.seconds}
    if done.returncode != 0:
        return record | {"error": (done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1]}
    return record | json.loads(done.stdout.strip().splitlines()[-1])


def table(records: list[dict]) -> str:
    """Markdown: per model and variant, the mean bpb over runs (and its range when there are several) and
    its change against that model's baseline."""
    from statistics import mean

    rows = {}
    for r in records:
        if "val_bpb" in r:
            rows.setdefault((r["model"], r["variant"]), []).append(r)
    lines = ["| model | variant | val bpb | range | vs baseline | steps | train bytes/s | runs (seeds) |",
             "|---|---|---|---|---|---|---|---|"]
    for (model, variant), runs in sorted(rows.items(), key=lambda kv: (kv[0][0], mean(r["val_bpb"] for r in kv[1]))):
        bpb = mean(r["val_bpb"] for r in runs)
        base = rows.get((model, "baseline"))
        change = f"{100 * (bpb / mean(r['val_bpb'] for r in base) - 1):+.1f}%" if base else "n/a"
        spread = f"{min(r['val_bpb'] for r in runs):.3f}-{max(r['val_bpb'] for r in runs):.3f}" if len(runs) > 1 else ""
        seeds = ",".join(str(r["seed"]) for r in runs)
        lines.append(f"| {model} | {variant} | {bpb:.3f} | {spread} | {change} | {mean(r['steps'] for r in runs):.0f} | "
                     f"{mean(r['train_bytes_per_s'] for r in runs):.0f} | {len(runs)} ({seeds}) |")
    failed = [r for r in records if "error" in r]
    lines += [f"\nfailed: {r['model']} {r['variant']} seed {r['seed']}: {r['error']}" for r in failed]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=90.0, help="optimizer seconds per run (default 90)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--combine", action="append", default=[], metavar="NAME=V1+V2+...",
                        help="an extra variant made of the overrides of others, e.g. best=muon+rmsnorm+wsd")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a dotted override added to every variant (e.g. train.optimizer=muon)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side, one thread each (default 2)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--val-bytes", type=int, default=32768, help="validation bytes scored per run")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--table", type=Path, help="print the table of an earlier --out file and exit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, overrides, seed = json.loads(args.child)
        print(json.dumps(run_one(model, overrides, seed, args)))
        return
    if args.table:
        print(table([json.loads(line) for line in args.table.read_text().splitlines() if line.strip()]))
        return
    variants = {}
    for name in args.variants.split(","):
        if name not in VARIANTS:
            parser.error(f"--variants: unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        variants[name] = VARIANTS[name] + args.set
    for spec in args.combine:
        name, _, parts = spec.partition("=")
        unknown = [p for p in parts.split("+") if p not in VARIANTS]
        if not name or not parts or unknown:
            parser.error(f"--combine {spec!r}: expected NAME=V1+V2 with known variants (unknown: {unknown})")
        variants[name] = [o for p in parts.split("+") for o in VARIANTS[p]] + args.set
    jobs = [(m, name, overrides, int(s)) for s in args.seeds.split(",") for name, overrides in variants.items()
            for m in args.models.split(",")]
    from common import emit

    records = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for record in pool.map(lambda job: launch(*job, args), jobs):
            emit(record, args.out)
            records.append(record)
    print(table(records))


if __name__ == "__main__":
    main()
