"""Does cluster selection earn its keep? A patched teacher distilled into a tiny student, three arms at equal compute.

The teacher (--teacher-preset, patched) trains for --teacher-minutes on tinyshakespeare's first 90%.
Each arm trains the same tiny student from the same initial weights for --student-steps steps of the
same batch and context (equal student compute; the KL arms also pay a teacher forward per step):
  cluster  TelemetrySynthesizer's k x per_cluster representatives, KL + data loss
  random   as many windows drawn uniformly, KL + data loss
  data     every window, the data loss alone (kl_weight 0)
Reported for the teacher and each arm: val bpb (held-out 10%), parameters, CPU generation bytes/s
(one 256-byte sample, KV cache), K/C/S of the predictions on held-out text and C/S of samples.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from bitlm import checkpoint as ckpt
from bitlm.config import TrainConfig
from bitlm.data import Corpus
from bitlm.distill import DistillConfig, collapse_submodel, measure, student_config
from bitlm.engine import fit
from bitlm.model import BitTransformerLM
from bitlm.sampling import generate

from common import contender_config, emit, load_shakespeare


def generation_bytes_per_s(model, n_bytes: int = 256) -> float:
    model = model.cpu().eval()
    generate(model, "ROMEO:", 8, seed=0)  # warm-up
    start = time.perf_counter()
    generate(model, "ROMEO:", n_bytes, temperature=0.8, seed=0)
    return n_bytes / (time.perf_counter() - start)


def scores(name: str, model, corpus: Corpus, args, extra: dict) -> dict:
    measured = measure(model, corpus, context_bytes=args.context_bytes, batch_size=16, eval_batches=args.eval_batches,
                       config=DistillConfig(n_samples=4, sample_bytes=256))
    return {"bench": "distill", "arm": name, "n_parameters": model.num_parameters(),
            "gen_bytes_per_s_cpu": generation_bytes_per_s(model), **measured, **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-preset", default="small")
    parser.add_argument("--teacher-minutes", type=float, default=10.0)
    parser.add_argument("--teacher-dir", type=Path, default=Path("runs/bench-distill-teacher"),
                        help="Reused when it holds a model trained with the same settings.")
    parser.add_argument("--student-preset", default="tiny")
    parser.add_argument("--student-steps", type=int, default=1000)
    parser.add_argument("--context-bytes", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--per-cluster", type=int, default=8)
    parser.add_argument("--eval-batches", type=int, default=40)
    parser.add_argument("--arms", default="cluster,random,data")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the student's weights, data order and selection.")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "distill.jsonl")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    corpus = Corpus.from_bytes(load_shakespeare(), window_bytes=256, val_fraction=0.1)
    train = TrainConfig(batch_size=args.batch_size, context_bytes=args.context_bytes, lr=3e-3, warmup_steps=100,
                        eval_every=10_000_000, eval_batches=4, log_every=100, seed=0, precision="fp32")
    marker = args.teacher_dir / "bench.txt"
    settings = f"{args.teacher_preset} {args.teacher_minutes} {args.context_bytes} {args.batch_size}"
    if marker.is_file() and marker.read_text() == settings:
        teacher = ckpt.from_pretrained(args.teacher_dir)
        teacher_seconds = teacher_steps = None
    else:
        torch.manual_seed(0)
        teacher = BitTransformerLM(contender_config("patched", args.teacher_preset, args.context_bytes))
        result = fit(teacher, corpus, dataclasses.replace(train, max_steps=10_000_000,
                                                          max_seconds=args.teacher_minutes * 60))
        teacher_seconds, teacher_steps = result.train_seconds, result.step
        ckpt.save_pretrained(teacher, args.teacher_dir)
        marker.write_text(settings)
    emit(scores("teacher", teacher, corpus, args, {"train_seconds": teacher_seconds, "steps": teacher_steps}), args.out)

    student = student_config(args.student_preset, teacher.config, args.context_bytes)
    student_train = dataclasses.replace(train, max_steps=args.student_steps, seed=args.seed)
    common = {"k": args.k, "per_cluster": args.per_cluster, "max_rounds": 1, "seed": args.seed}
    arms = {"cluster": DistillConfig(selection="cluster", **common),
            "random": DistillConfig(selection="random", **common),
            "data": DistillConfig(selection="all", kl_weight=0.0, data_weight=1.0, **common)}
    for name in args.arms.split(","):
        start = time.perf_counter()
        result = collapse_submodel(teacher, corpus, {}, student=student, train=student_train, config=arms[name])
        seconds = time.perf_counter() - start
        emit(scores(name, result.student, corpus, args, {
            "wall_seconds": seconds, "steps": args.student_steps, "seed": args.seed,
            "n_windows": len(result.selection.indices),
            "teacher_val_bpb": result.teacher_metrics["val_bpb"]}), args.out)


if __name__ == "__main__":
    main()
