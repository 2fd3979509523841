"""Entry points of the 2-process pipeline tests: spawn imports them from here (a test module is not importable)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from bitlm.config import ModelConfig, TrainConfig
from bitlm.data import Corpus
from bitlm.engine import build_optimizer, evaluate, fit
from bitlm.model import BitTransformerLM
from bitlm.objective import model_inputs
from bitlm.parallel import named_optimizer_state
from bitlm.pipelining import PipelineStrategy

TEXT = b"".join(b"%d: the quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\n" % i
                for i in range(40))


def tiny_model(kind: str, n_layers: int, seed: int = 0) -> BitTransformerLM:
    torch.manual_seed(seed)
    return BitTransformerLM(ModelConfig.from_name("tiny", kind=kind, n_layers=n_layers))


def fixed_batch(batch_size: int = 8, context_bytes: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (batch_size, context_bytes), dtype=torch.uint8, generator=g)


def small_corpus() -> Corpus:
    return Corpus.from_bytes(TEXT, window_bytes=64, val_fraction=0.25)


EVAL_CFG = TrainConfig(batch_size=5, context_bytes=20, eval_batches=10)  # the last eval batch is partial


def _init(rank: int, world_size: int, directory: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=rank, world_size=world_size)


def run_all(rank: int, world_size: int, directory: str, steps: list[dict], evals: list[dict],
            fit_scenario: dict | None) -> None:
    """One process group for every scenario: spawning and importing torch is most of a test's cost."""
    _init(rank, world_size, directory)
    run_steps(rank, world_size, directory, steps)
    run_eval_and_checkpoint(rank, world_size, directory, evals)
    if fit_scenario is not None:
        run_fit(rank, world_size, directory, **fit_scenario)
    # both ranks done before either tears the group down: a rank that left while the other's gloo
    # threads still served a send or receive killed it with SIGABRT ("terminate called without an
    # active exception"), seen once in a clean-clone run
    dist.barrier()
    (Path(directory) / f"done-{rank}").write_text("every scenario written\n")
    dist.destroy_process_group()


def run_steps(rank: int, world_size: int, directory: str, scenarios: list[dict]) -> None:
    """Per scenario: two forward_backward calls at scale 0.5 on the fixed batch, then clip_grad_norm."""
    results = {}
    for sc in scenarios:
        model = tiny_model(sc["kind"], sc["n_layers"])
        strategy = PipelineStrategy(rank=rank, world_size=world_size, n_microbatches=sc["n_microbatches"],
                                    schedule=sc["schedule"])
        strategy.wrap(model)
        outs = [strategy.forward_backward(fixed_batch(), 0.5) for _ in range(2)]
        res = {"loss": [float(o.loss) for o in outs], "nll_bits": [float(o.nll_bits) for o in outs],
               "n_bytes": [o.n_bytes for o in outs],
               "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
               "state_keys": list(model.state_dict())}
        res["clip_norm"] = strategy.clip_grad_norm(model, 0.01)
        res["clipped"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[sc["name"]] = res
    torch.save(results, Path(directory) / f"steps-{rank}.pt")


def run_eval_and_checkpoint(rank: int, world_size: int, directory: str, scenarios: list[dict]) -> None:
    """Per scenario: evaluate, one optimizer step, full_state (rank 0 writes it), load_full_state into a fresh model."""
    corpus = small_corpus()
    results = {}
    for sc in scenarios:
        model = tiny_model(sc["kind"], sc["n_layers"])
        model.set_reference_marginals(corpus.phase_marginals(model.config.parity))
        strategy = PipelineStrategy(rank=rank, world_size=world_size, n_microbatches=2)
        strategy.wrap(model)
        metrics = evaluate(model, corpus, EVAL_CFG, strategy=strategy)
        optimizer = build_optimizer(model, EVAL_CFG)
        strategy.forward_backward(fixed_batch(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        full = strategy.full_state(model, optimizer)
        logits = strategy.eval_logits(model, model_inputs(model, fixed_batch()))
        path = Path(directory) / f"full-{sc['name']}.pt"
        if rank == 0:
            torch.save(full, path)
        dist.barrier()
        fresh = tiny_model(sc["kind"], sc["n_layers"], seed=1)
        resumed = PipelineStrategy(rank=rank, world_size=world_size, n_microbatches=2)
        resumed.wrap(fresh)
        fresh_optimizer = build_optimizer(fresh, EVAL_CFG)
        model_state, optimizer_state = torch.load(path)
        resumed.load_full_state(fresh, fresh_optimizer, model_state, optimizer_state)
        restored = all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())
        a, b = named_optimizer_state(model, optimizer), named_optimizer_state(fresh, fresh_optimizer)
        restored = restored and a["state"].keys() == b["state"].keys() and all(
            torch.equal(a["state"][n][k], b["state"][n][k]) for n in a["state"] for k in ("exp_avg", "exp_avg_sq"))
        results[sc["name"]] = {"metrics": metrics, "logits": logits, "restored": restored,
                               "full_is_none": full is None}
    torch.save(results, Path(directory) / f"eval-{rank}.pt")


def run_fit(rank: int, world_size: int, directory: str, kind: str, n_layers: int, schedule: str) -> None:
    """engine.fit with the pipeline strategy for 20 steps, evaluating at 10 and 20; saves the reported metrics."""
    model = tiny_model(kind, n_layers)
    cfg = TrainConfig(batch_size=8, context_bytes=16, max_steps=20, lr=3e-3, warmup_steps=2, log_every=5,
                      eval_every=10, eval_batches=2)
    history: list[dict] = []
    fit(model, small_corpus(), cfg, strategy=PipelineStrategy(rank=rank, world_size=world_size, schedule=schedule),
        device="cpu", report=lambda metrics, path: history.append(dict(metrics)))
    torch.save(history, Path(directory) / f"fit-{rank}.pt")
