"""Pipeline bubble of PipelineStrategy on 2 gloo processes: measured vs GPipe's (p-1)/(m+p-1).

bubble of a rank = 1 - busy / wall, where wall is one forward_backward call (all micro-batches,
forward and backward, plus the loss broadcast; ranks start together after a barrier) and busy is
the time this rank spends in its stage's compute: PipelineStage.forward_one_chunk,
backward_one_chunk and the loss function. Everything else in the step is waiting on the other
stage or on communication. Each rank runs one torch thread on its own core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bitlm.config import TrainConfig
from bitlm.data import Corpus
from bitlm.engine import build_optimizer
from bitlm.model import BitTransformerLM
from bitlm.objective import batch_loss
from bitlm.pipelining import PipelineStrategy

from common import contender_config, emit, load_shakespeare

N_STAGES = 2


def _timed(fn, box: list):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            box[0] += time.perf_counter() - start
    return wrapper


def _measure(rank: int, args, schedule: str, n_microbatches: int, batches) -> dict:
    torch.manual_seed(0)
    model = BitTransformerLM(contender_config(args.model, args.preset, args.context_bytes)).train()
    strategy = PipelineStrategy(rank=rank, world_size=N_STAGES, n_microbatches=n_microbatches, schedule=schedule)
    strategy.wrap(model)
    optimizer = build_optimizer(model, TrainConfig(batch_size=args.batch_size, context_bytes=args.context_bytes))
    busy = [0.0]
    walls, busies = [], []
    for i in range(args.warmup + args.steps):
        batch = next(batches)
        if i == 1:  # the schedule exists after the first step (it infers the stage shapes there)
            stage = strategy._pipe._stage
            stage.forward_one_chunk = _timed(stage.forward_one_chunk, busy)
            stage.backward_one_chunk = _timed(stage.backward_one_chunk, busy)
            strategy._pipe._loss_fn = _timed(strategy._pipe._loss_fn, busy)
        dist.barrier()
        busy[0] = 0.0
        start = time.perf_counter()
        strategy.forward_backward(batch, 1.0)
        wall = time.perf_counter() - start
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= args.warmup:
            walls.append(wall)
            busies.append(busy[0])
    bubbles = [1 - b / w for b, w in zip(busies, walls)]
    return {"s_per_step": statistics.median(walls), "busy_s": statistics.median(busies),
            "bubble": statistics.median(bubbles)}


def _worker(rank: int, args, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=N_STAGES)
    corpus = Corpus.from_bytes(load_shakespeare(), window_bytes=1024)
    records = []
    for schedule in args.schedules.split(","):
        for m in (int(v) for v in args.microbatches.split(",")):
            batches = corpus.train.random_batches(args.batch_size, args.context_bytes, seed=0)
            mine = _measure(rank, args, schedule, m, batches)
            per_rank = [None] * N_STAGES
            dist.all_gather_object(per_rank, mine)
            records.append({"schedule": schedule, "n_microbatches": m, "per_rank": per_rank})
    if rank == 0:
        Path(out).write_text(json.dumps(records))
    dist.destroy_process_group()


def single_process_seconds(args) -> float:
    """Median seconds of forward+backward of the whole model in one process with one thread (no pipeline)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = BitTransformerLM(contender_config(args.model, args.preset, args.context_bytes)).train()
    batches = Corpus.from_bytes(load_shakespeare(), window_bytes=1024).train.random_batches(
        args.batch_size, args.context_bytes, seed=0)
    times = []
    for i in range(args.warmup + args.steps):
        batch = next(batches)
        start = time.perf_counter()
        batch_loss(model, batch).loss.backward()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="flat", choices=("flat", "patched", "byte"))
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context-bytes", type=int, default=64)
    parser.add_argument("--microbatches", default="4,8")
    parser.add_argument("--schedules", default="gpipe,1f1b")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    single = single_process_seconds(args)
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/records.json"
        mp.spawn(_worker, args=(args, f"{tmp}/store", out), nprocs=N_STAGES, join=True)
        records = json.loads(Path(out).read_text())
    load = os.getloadavg()[0]  # other processes on the 2 cores inflate the bubble: say how busy the machine was
    for r in records:
        m, ranks = r["n_microbatches"], r["per_rank"]
        wall = max(x["s_per_step"] for x in ranks)
        emit({"bench": "pipeline_bubble", "model": args.model, "preset": args.preset, "schedule": r["schedule"],
              "n_stages": N_STAGES, "n_microbatches": m, "batch_size": args.batch_size,
              "context_bytes": args.context_bytes, "s_per_step": wall,
              "busy_s_per_rank": [x["busy_s"] for x in ranks], "bubble_per_rank": [x["bubble"] for x in ranks],
              "bubble_mean": statistics.mean(x["bubble"] for x in ranks),
              "bubble_gpipe_theory": (N_STAGES - 1) / (m + N_STAGES - 1),
              "single_process_s_per_step": single, "speedup_vs_single_process": single / wall,
              "load_avg_1m": load}, args.out)


if __name__ == "__main__":
    main()
