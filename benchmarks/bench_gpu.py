"""The GPU suite's measurements, one subcommand each: race, mfu, fsdp, generation (gpu_suite.sh runs them in order).

On a GPU every part uses the `base` preset in bf16. `--smoke` (or BITLM_GPU_SMOKE=1) runs the same
code on the CPU with the `tiny` preset, short budgets and gloo for FSDP, so the suite can be checked
on a machine without one; its numbers say nothing about a GPU. `--set model.KEY=VALUE` and
`--set train.KEY=VALUE` reach the configs of every part (the race, MFU and FSDP runs' ExperimentConfig,
the generation models' ModelConfig). Every part runs `--recipe` (default: the commands' default,
bitlm.recipes) under the --set overrides; the FSDP part gets the recipe's FSDP fallback (AdamW).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import socket
import time
from pathlib import Path

import torch

from bitlm.config import ExperimentConfig, TrainConfig
from bitlm.data import Corpus
from bitlm.engine import autocast_factory, build_optimizer, fit
from bitlm.model import BitTransformerLM
from bitlm.objective import batch_loss, evaluate_bpb
from bitlm.parallel import FSDPStrategy, parallelize
from bitlm.recipes import DEFAULT_RECIPE, RECIPES
from bitlm.sampling import generate_ids, prompt_ids
from bitlm.strategy import Strategy

from common import SHAKESPEARE, contender_config, emit, recipe_model, with_recipe
from gpu_flops import dense_bf16_peak, train_flops_per_row

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_suite.jsonl"


@dataclasses.dataclass(frozen=True)
class Settings:
    """What differs between a GPU run and a CPU smoke run; everything else is the same code."""

    smoke: bool
    device: torch.device
    preset: str
    batch_size: int
    context_bytes: int
    overrides: tuple[str, ...]
    recipe: str = DEFAULT_RECIPE

    @property
    def record(self) -> dict:
        return {"smoke": self.smoke, "preset": self.preset, "batch_size": self.batch_size,
                "context_bytes": self.context_bytes, "recipe": self.recipe, "overrides": list(self.overrides)}


def settings_from(args) -> Settings:
    smoke = args.smoke or os.environ.get("BITLM_GPU_SMOKE") == "1"
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --smoke (BITLM_GPU_SMOKE=1) for the CPU check")
    if smoke:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        return Settings(True, torch.device("cpu"), "tiny", 4, 32, tuple(args.set), args.recipe)
    torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 parts (evaluation, generation) as a user runs them
    return Settings(False, torch.device("cuda"), "base", args.batch_size, args.context_bytes, tuple(args.set), args.recipe)


def experiment(s: Settings, kind: str, strategy: str | None = None, **train) -> ExperimentConfig:
    """The run of `kind` (byte, patched) at the suite's shape, bf16 on a GPU, with the recipe and --set overrides."""
    model = contender_config(kind, s.preset, s.context_bytes)
    train_cfg = TrainConfig(batch_size=s.batch_size, context_bytes=s.context_bytes,
                            precision="fp32" if s.smoke else "bf16", **train)
    return with_recipe(ExperimentConfig(model=model, train=train_cfg), s.recipe, s.overrides, strategy)


def load_corpus() -> Corpus:
    path = Path(os.environ.get("BITLM_CORPUS") or SHAKESPEARE)
    if not path.is_file():
        raise SystemExit(f"{path} not found: set BITLM_CORPUS to tinyshakespeare.txt (copied into the repo tree)")
    return Corpus.from_bytes(path.read_bytes(), window_bytes=1024, val_fraction=0.1)


def synchronize(s: Settings) -> None:
    if s.device.type == "cuda":
        torch.cuda.synchronize()


def race(s: Settings, args, out: Path) -> None:
    """Byte baseline vs patched bit model, equal training seconds each: final val bits/byte, bytes/s."""
    corpus = load_corpus()
    seconds = 3.0 if s.smoke else args.minutes * 60
    for kind in args.models.split(","):
        exp = experiment(s, kind, lr=args.lr, max_steps=10_000_000, max_seconds=seconds,
                         warmup_steps=5 if s.smoke else args.warmup_steps, eval_every_steps=10_000_000,
                         n_eval_batches=2 if s.smoke else 10, log_every_steps=5 if s.smoke else 50)
        torch.manual_seed(0)
        model = BitTransformerLM(exp.model)
        logs = []
        result = fit(model, corpus, exp, device=s.device,
                     report=lambda m, c: logs.append(m) if "bytes_per_s" in m else None)
        val_batches = corpus.val.sequential_batches(s.batch_size, s.context_bytes)
        if s.smoke:
            val_batches = (b for b, _ in zip(val_batches, range(4)))
        final = evaluate_bpb(result.model, val_batches)
        later = [m["bytes_per_s"] for m in logs[1:]] or [logs[-1]["bytes_per_s"]]  # the first window holds warm-up
        emit({"bench": "gpu_race", "model": kind, "budget_seconds": seconds, "params": model.num_parameters(),
              "steps": result.step, "train_seconds": result.train_seconds, "val_bpb": final["bpb"],
              "val_bytes_scored": final["n_bytes"], "train_bytes_per_s": sum(later) / len(later),
              "last_train_loss": logs[-1]["train/loss"], "lr": exp.train.lr,
              "warmup_steps": exp.train.warmup_steps, "compile": exp.train.compile} | s.record, out)


def timed_steps(s: Settings, net, base, opt, autocast, batches, n_warmup: int, n_steps: int) -> tuple[float, float]:
    """(seconds per optimizer step after n_warmup untimed ones, seconds the warm-up took)."""
    start = time.perf_counter()
    for i in range(n_warmup + n_steps):
        if i == n_warmup:
            synchronize(s)
            warmup_seconds = time.perf_counter() - start
            start = time.perf_counter()
        with autocast():
            out = batch_loss(net, next(batches).to(s.device))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(base.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    synchronize(s)
    loss = float(out.loss.detach())
    if not math.isfinite(loss):
        raise SystemExit(f"mfu: the training loss is {loss}")
    return (time.perf_counter() - start) / n_steps, warmup_seconds


def mfu(s: Settings, args, out: Path) -> None:
    """Training FLOP/s of the base preset, eager and with torch.compile of each block, over the bf16 peak."""
    corpus = load_corpus()
    device_name = torch.cuda.get_device_name(0) if s.device.type == "cuda" else "cpu"
    peak = dense_bf16_peak(device_name, args.peak_tflops)
    n_warmup, n_steps = (1, 2) if s.smoke else (args.warmup, args.steps)
    for kind in args.models.split(","):
        for compiled in (False, True):
            exp = experiment(s, kind)
            torch.manual_seed(0)
            base = BitTransformerLM(exp.model).to(s.device).train()
            flops = train_flops_per_row(base, s.context_bytes)
            net = parallelize(base, Strategy(), compile=compiled)
            opt = build_optimizer(base, exp.train)
            batches = corpus.train.random_batches(s.batch_size, s.context_bytes, seed=0)
            step_seconds, warmup_seconds = timed_steps(s, net, base, opt, autocast_factory(exp.train.precision, s.device),
                                                       batches, n_warmup, n_steps)
            flops_per_step = s.batch_size * sum(flops.values())
            achieved = flops_per_step / step_seconds
            emit({"bench": "gpu_mfu", "model": kind, "compile": compiled, "params": base.num_parameters(),
                  "s_per_step": step_seconds, "warmup_seconds": warmup_seconds, "n_steps": n_steps,
                  "bytes_per_s": s.batch_size * s.context_bytes / step_seconds,
                  "flops_per_step": flops_per_step, "flops_share": {k: v / sum(flops.values()) for k, v in flops.items()},
                  "achieved_tflops": achieved / 1e12, "peak_tflops": peak / 1e12 if peak else None,
                  "mfu": achieved / peak if peak else None, "precision": exp.train.precision} | s.record, out)
            del net, base, opt
            if s.device.type == "cuda":
                torch.cuda.empty_cache()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fsdp(s: Settings, args, out: Path) -> None:
    """A few engine.fit steps through FSDPStrategy (bf16 mixed precision on GPU) in a world of one rank."""
    import torch.distributed as dist

    backend = "nccl" if s.device.type == "cuda" else "gloo"
    if s.device.type == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        corpus = load_corpus()
        n_steps = 4 if s.smoke else args.steps
        exp = experiment(s, args.model, "fsdp", max_steps=n_steps, warmup_steps=2, log_every_steps=max(1, n_steps // 2),
                         eval_every_steps=10_000_000, n_eval_batches=2)
        exp = dataclasses.replace(exp, parallel=dataclasses.replace(exp.parallel, strategy="fsdp"))
        # make_strategy gives one rank the plain strategy (nothing to shard); the suite wants FSDP2's code path itself
        strategy = FSDPStrategy(rank=0, world_size=1)
        torch.manual_seed(0)
        model = BitTransformerLM(exp.model)
        logs = []
        result = fit(model, corpus, exp, strategy=strategy, device=s.device,
                     report=lambda m, c: logs.append(m) if "bytes_per_s" in m else None)
        from torch.distributed.fsdp import FSDPModule

        bytes_per_s = logs[-1]["bytes_per_s"]  # the last window: after the first step's warm-up
        emit({"bench": "gpu_fsdp", "model": args.model, "backend": backend, "world_size": dist.get_world_size(),
              "fully_sharded": isinstance(result.model, FSDPModule), "mixed_precision_bf16": s.device.type == "cuda",
              "steps": result.step, "last_train_loss": logs[-1]["train/loss"],
              "finite": math.isfinite(logs[-1]["train/loss"]), "bytes_per_s": bytes_per_s,
              "positions_per_s": bytes_per_s * exp.model.positions_per_byte} | s.record, out)
    finally:
        dist.destroy_process_group()


def generation(s: Settings, args, out: Path) -> None:
    """Sampling bytes/s with the KV cache at batch 1 and 64 (freshly initialised weights: speed only)."""
    prompt = ("To be, or not to be, that is the question: " * 8)[: args.prompt_bytes].encode()
    new_bytes = 4 if s.smoke else args.new_bytes
    for kind in args.models.split(","):
        cfg = recipe_model(contender_config(kind, s.preset, args.prompt_bytes + new_bytes), s.recipe, s.overrides)
        torch.manual_seed(0)
        model = BitTransformerLM(cfg).to(s.device).eval()
        for batch in (1, 4 if s.smoke else 64):
            ids = prompt_ids(cfg, prompt)[None].repeat(batch, 1)
            generate_ids(model, ids, 2 * cfg.ids_per_byte, seed=0)  # warm-up: kernels, allocator
            synchronize(s)
            start = time.perf_counter()
            generate_ids(model, ids, new_bytes * cfg.ids_per_byte, seed=0)
            synchronize(s)
            seconds = time.perf_counter() - start
            emit({"bench": "gpu_generation", "model": kind, "batch": batch, "params": model.num_parameters(),
                  "prompt_bytes": len(prompt), "new_bytes": new_bytes, "seconds": seconds,
                  "bytes_per_s": batch * new_bytes / seconds, "bytes_per_s_per_row": new_bytes / seconds,
                  "dtype": "fp32 (TF32 matmuls on GPU)"} | s.record, out)


def main() -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--smoke", action="store_true", help="CPU, tiny preset, seconds (also BITLM_GPU_SMOKE=1)")
    common.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) / "gpu_suite.jsonl"
                        if os.environ.get("OUT") else RESULTS)
    common.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="an override of the run's config, e.g. model.n_layers=12 or train.lr=2e-3")
    common.add_argument("--recipe", choices=sorted(RECIPES), default=DEFAULT_RECIPE,
                        help="named overrides applied before --set (bitlm/recipes.py)")
    common.add_argument("--batch-size", type=int, default=64)
    common.add_argument("--context-bytes", type=int, default=512)
    parser = argparse.ArgumentParser(description=__doc__)
    parts = parser.add_subparsers(dest="part", required=True)
    p = parts.add_parser("race", parents=[common], help=race.__doc__)
    p.add_argument("--minutes", type=float, default=2.0, help="training budget per model")
    p.add_argument("--models", default="byte,patched")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=200)
    p = parts.add_parser("mfu", parents=[common], help=mfu.__doc__)
    p.add_argument("--models", default="patched")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps (compilation happens here)")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the device, instead of the table")
    p = parts.add_parser("fsdp", parents=[common], help=fsdp.__doc__)
    p.add_argument("--model", default="patched")
    p.add_argument("--steps", type=int, default=30)
    p = parts.add_parser("generation", parents=[common], help=generation.__doc__)
    p.add_argument("--models", default="byte,patched")
    p.add_argument("--prompt-bytes", type=int, default=64)
    p.add_argument("--new-bytes", type=int, default=128)
    args = parser.parse_args()
    s = settings_from(args)
    {"race": race, "mfu": mfu, "fsdp": fsdp, "generation": generation}[args.part](s, args, args.out)


if __name__ == "__main__":
    main()
