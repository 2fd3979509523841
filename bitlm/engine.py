"""Single-process training loop: AdamW, LR schedule, accumulation, clipping, AMP, eval in bpb, resume."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from safetensors import SafetensorError

from . import checkpoint as ckpt
from .config import DiffusionConfig, ScalingConfig, TrainConfig, to_dict
from .diffusion import diffusion_loss, evaluate_elbo
from .evaluation import data_telemetry, prediction_telemetry
from .objective import (COMPRESSED_STREAM, LossOutput, causal_loss, compressed_rows, evaluate_bpb,
                        stream_loss, telemetry_penalty)
from .parallel import Strategy
from .scaling import PlateauDetector, expanded_lr_scale, grow, grown_from
from .telemetry import detect_metric_drift

Report = Callable[[dict[str, Any], Optional[Path]], None]
"""Called with (metrics, checkpoint directory or None) at every log, eval, scaling and checkpoint event.

Every rank calls it the same number of times (Ray Train's rule); only the checkpoint writer
passes a directory. A scaling event carries metrics["event"] == "expand" and "scaling/kind".
"""

TELEMETRY_KEYS = ("val/K", "val/C", "val/S")  # of the model's predictions; data/C and data/S are the data's


class NonFiniteLossError(RuntimeError):
    """Training met a non-finite loss, gradient norm or weights and stopped; no checkpoint of them was written."""

    def __init__(self, step: int, what: str, checkpoint: Optional[Path]):
        self.step, self.what, self.checkpoint = step, what, checkpoint
        kept = f"the last good checkpoint is {checkpoint}" if checkpoint is not None else "no checkpoint was written"
        super().__init__(f"training step {step}: {what}; training stopped and {kept} "
                         "(a smaller train.lr, train.lambda_k/c/s or train.grad_clip usually helps)")

    def __reduce__(self):  # Ray sends a worker's exception to the driver pickled; rebuild it from its fields
        return (type(self), (self.step, self.what, self.checkpoint))


class MetricDriftWarning(UserWarning):
    """A validation telemetry metric moved by more than train.drift_threshold between windows."""


@dataclass
class FitResult:
    step: int
    train_seconds: float
    metrics: dict[str, float]  # the last evaluation
    history: list[dict[str, float]] = field(default_factory=list)  # every evaluation, in order
    checkpoint: Optional[Path] = None
    model: Any = None  # the trained model: a new, larger one when progressive scaling grew it
    expansions: list[dict[str, Any]] = field(default_factory=list)
    # data/C and data/S: C and S of the validation bits themselves, beside the model's val/C and val/S
    data_reference: dict[str, float] = field(default_factory=dict)


def compress_probability(cfg: TrainConfig, step: int) -> float:
    """cfg.compress_prob after the warm-up and linear ramp: 0 before compress_warmup_steps."""
    if cfg.compress_prob == 0 or step < cfg.compress_warmup_steps:
        return 0.0
    if cfg.compress_ramp_steps == 0:
        return cfg.compress_prob
    return cfg.compress_prob * min(1.0, (step - cfg.compress_warmup_steps + 1) / cfg.compress_ramp_steps)


def resolve_device(device: Optional[str | torch.device] = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_factory(precision: str, device: torch.device) -> Callable[[], Any]:
    """A zero-argument factory of the autocast context for `precision` on `device`."""
    use_bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def lr_factor(cfg: TrainConfig, step: int, train_seconds: float) -> float:
    """Multiplier of cfg.lr at `step`; progress follows time instead of steps when a time budget is set."""
    progress = step / cfg.max_steps
    if cfg.max_seconds is not None:
        progress = max(progress, train_seconds / cfg.max_seconds)
    progress = min(progress, 1.0)
    if cfg.schedule == "onecycle":
        # cosine ramp from lr/25 to lr over the warm-up fraction, then cosine down to lr/1e4
        warm = min(max(cfg.warmup_steps / cfg.max_steps, 1e-3), 0.5)
        if progress < warm:
            return 0.04 + 0.96 * (1 - math.cos(math.pi * progress / warm)) / 2
        t = (progress - warm) / (1 - warm)
        return 1e-4 + (1 - 1e-4) * (1 + math.cos(math.pi * t)) / 2
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the weights of linear layers only (not biases, norms or embeddings)."""
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) in decayed], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def telemetry_means(model, byte_batch: torch.Tensor, *, seed: int = 0) -> dict[str, float]:
    """Mean K, C, S of what the model predicts for one byte batch (bitlm.evaluation.prediction_telemetry)."""
    return prediction_telemetry(model, byte_batch, seed=seed)


def _non_finite_weight(state: dict[str, torch.Tensor]) -> Optional[str]:
    """The name of the first floating-point tensor of `state` holding a nan or inf, or None."""
    for name, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


def fit(model, corpus, cfg: TrainConfig, *, diffusion: Optional[DiffusionConfig] = None,
        report: Optional[Report] = None, checkpoint_dir: Optional[str | Path] = None, resume: bool = True,
        device: Optional[str | torch.device] = None, rank: int = 0, world_size: int = 1,
        progress: bool = False, strategy: Optional[Strategy] = None, resume_from: Optional[str | Path] = None,
        scaling: Optional[ScalingConfig] = None, loss: Optional[Callable[[Any, torch.Tensor], LossOutput]] = None
        ) -> FitResult:
    """Train `model` on `corpus` (a bitlm.data.Corpus) following `cfg`.

    A causal model learns next-bit prediction; a non-causal one learns masked diffusion per
    `diffusion` (its loss is the ELBO, evaluated as val/elbo_bpb, an upper bound on bpb).

    With `checkpoint_dir`, the writer rank saves step-NNNNNNNN/ checkpoints there and, when `resume`,
    training continues from the newest one (or from `resume_from`): same data order, optimizer and
    RNG state, so the loss curve is the one an uninterrupted run would have produced. A damaged
    newer checkpoint is skipped with a CheckpointWarning (none loadable: CheckpointError), and
    temp directories that a kill during a save left behind are removed first.

    A non-finite loss, gradient norm, validation loss or weight stops training with
    NonFiniteLossError before anything of it is saved; the checkpoints on disk stay the good ones.

    `strategy` (bitlm.parallel) says how this rank holds the model (DDP, FSDP, a pipeline stage);
    its rank and world size override `rank`/`world_size`. `scaling` grows the model when the
    validation loss plateaus (bitlm.scaling); the grown model is FitResult.model.
    `loss(net, byte_batch)` replaces objective.causal_loss as a causal model's training objective
    (bitlm.distill's distillation loss); evaluation still scores the plain causal loss.
    """
    device = resolve_device(device)
    strategy = strategy or Strategy(rank=rank, world_size=world_size)
    rank, world_size = strategy.rank, strategy.world_size
    diffusion = diffusion or DiffusionConfig()
    scaling = scaling or ScalingConfig()
    torch.manual_seed(cfg.seed)

    step, train_seconds, history, expansions = 0, 0.0, [], []
    context_bytes = cfg.context_bytes
    if checkpoint_dir is not None and strategy.writes_checkpoints:
        ckpt.remove_stale_temporaries(checkpoint_dir)  # left by a kill during a save; this rank is the one writer
    latest = Path(resume_from) if resume_from else (
        ckpt.latest_checkpoint(checkpoint_dir) if (checkpoint_dir and resume) else None)
    saved = None
    if latest is not None:
        saved, saved_config = _read_resume_point(latest)
        trainer = saved[2]
        step, train_seconds, history = trainer["step"], trainer["train_seconds"], trainer["history"]
        expansions = trainer.get("expansions", [])
        context_bytes = trainer.get("context_bytes", context_bytes)
        if saved_config != model.config:
            if not grown_from(model.config, saved_config):
                raise ValueError(f"{latest}: the checkpoint holds a different model ({saved_config}) than the one "
                                 f"requested ({model.config}); start a new run (another name or directory)")
            model = type(model)(saved_config)  # the run grew before it stopped: continue with the grown shape
    base = model.to(device)
    _check_context(base, context_bytes)
    # S compares bits with the corpus for either representation (the byte model's bytes as bits)
    base.set_reference_marginals(corpus.phase_marginals(base.config.parity))
    strategy.check(base, cfg, diffusion)
    if scaling.enabled:
        if strategy.name == "pipeline":
            raise ValueError("scaling.enabled: progressive scaling is not available with the pipeline strategy")
        detector = PlateauDetector(scaling.window, scaling.improve_thresh)
        if saved is not None and "plateau" in saved[2]:
            detector.load_state_dict(saved[2]["plateau"])
    if cfg.qat:  # before the optimizer and any wrapper: they see the fake-quantized layers
        from .quantization import prepare_qat

        prepare_qat(base, cfg.qat_group_size)
    n_parameters = base.num_parameters()  # of the whole model, before a strategy shards or splits it
    net = strategy.wrap(base)
    optimizer = build_optimizer(base, cfg)
    if saved is not None:
        strategy.load_full_state(base, optimizer, saved[0], saved[1])
        ckpt.restore_rng(latest)
        saved = None
    autocast = autocast_factory(cfg.precision, device)
    if cfg.compile:
        net = torch.compile(net)
    evaluate_fn = strategy.evaluate or evaluate

    if loss is not None and (not base.config.causal or cfg.compress_prob > 0 or strategy.owns_backward):
        raise ValueError("fit(loss=...): a custom objective needs a causal model, train.compress_prob=0 and a "
                         "strategy that leaves the backward pass to fit (not the pipeline strategy)")
    if cfg.compress_prob > 0 and (base.config.n_streams < 2 or not base.config.causal):
        raise ValueError("train.compress_prob > 0 needs a causal model with model.n_streams >= 2 "
                         f"(got n_streams={base.config.n_streams}, causal={base.config.causal})")

    def objective(batch, micro_index: int, progress: float) -> tuple[LossOutput, dict[str, float]]:
        if not base.config.causal:
            # one generator per micro-batch, seeded by its index, keeps resumed runs exact
            noise = torch.Generator().manual_seed(cfg.seed * 1_000_003 + micro_index)
            return diffusion_loss(net, batch, schedule=diffusion.noise_schedule, generator=noise,
                                  progress=progress, curriculum=diffusion.curriculum), {}
        if loss is not None:
            return loss(net, batch), {}
        p = compress_probability(cfg, micro_index // cfg.grad_accum_steps)
        if p == 0:
            return causal_loss(net, batch), {}
        picked = np.random.default_rng([cfg.seed, micro_index, 7]).random(batch.shape[0]) < p
        if not picked.any():
            return causal_loss(net, batch), {"compressed_fraction": 0.0}
        ids, mask, ratio = compressed_rows(batch[torch.from_numpy(picked)], base.config.parity)
        compressed = stream_loss(net, ids, mask, COMPRESSED_STREAM)
        stats = {"compressed_fraction": float(picked.mean()), "compression_ratio": ratio}
        if picked.all():
            zero = compressed.new_zeros(())
            return LossOutput(loss=compressed, nll_bits=zero.detach(), n_bytes=0), stats
        text = causal_loss(net, batch[torch.from_numpy(~picked)])
        mixed = (text.loss * (~picked).sum() + compressed * picked.sum()) / batch.shape[0]
        return dataclasses.replace(text, loss=mixed), stats

    # Data-parallel ranks each take batch_size rows of one global batch drawn as a single process
    # would draw batch_size * world_size rows, so a W-worker run sees exactly the batches of a
    # 1-worker run with a W times larger batch. A pipeline feeds one batch through all ranks.
    replicas = 1 if strategy.owns_backward else world_size

    def make_batches(context: int):
        drawn = corpus.train.random_batches(cfg.batch_size * replicas, context, seed=cfg.seed,
                                            start_step=step * cfg.grad_accum_steps)
        if replicas == 1:
            return drawn
        return (batch[rank * cfg.batch_size:(rank + 1) * cfg.batch_size] for batch in drawn)

    batches = make_batches(context_bytes)
    # every rank scores the same eval_batches global batches: W workers evaluate what one worker with
    # a W-times batch evaluates, so their curves are comparable
    eval_cfg = dataclasses.replace(cfg, context_bytes=context_bytes, batch_size=cfg.batch_size * replicas)
    bytes_seen = float(history[-1].get("bytes_seen", 0)) if history else 0.0
    emit = report or (lambda metrics, path: None)
    bar = _progress_bar(progress, cfg, step)
    window_loss, window_bits, window_bytes, window_time, window_steps = 0.0, 0.0, 0, 0.0, 0
    window_stats: dict[str, float] = {}  # per-step means of objective statistics (compression)
    last_checkpoint = latest
    data_reference: Optional[dict[str, float]] = None
    metrics: dict[str, float] = history[-1] if history else {}

    def save(final: bool) -> None:
        nonlocal last_checkpoint
        if checkpoint_dir is None:
            return
        gathered = strategy.full_state(base, optimizer)  # collective: every rank takes part
        path = None
        if strategy.writes_checkpoints:
            bad = _non_finite_weight(gathered[0] if gathered is not None else base.state_dict())
            if bad is not None:
                raise NonFiniteLossError(step, f"weight {bad} is not finite after the optimizer step", last_checkpoint)
            trainer = {"step": step, "train_seconds": train_seconds, "history": history, "train": to_dict(cfg),
                       "context_bytes": context_bytes, "expansions": expansions}
            if scaling.enabled:
                trainer["plateau"] = detector.state_dict()
            path = last_checkpoint = ckpt.save_checkpoint(ckpt.step_directory(checkpoint_dir, step), base,
                                                          optimizer, trainer, state=gathered)
            ckpt.prune_checkpoints(checkpoint_dir, cfg.keep_checkpoints)
        emit({"step": step, "final": final}, path)

    base.train()
    while step < cfg.max_steps and (cfg.max_seconds is None or train_seconds < cfg.max_seconds):
        t0 = time.perf_counter()
        lr = cfg.lr * lr_factor(cfg, step, train_seconds)
        if expansions:
            lr *= expanded_lr_scale(scaling, len(expansions), step - expansions[-1]["step"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(cfg.grad_accum_steps):
            if strategy.owns_backward:
                with autocast():
                    out = strategy.forward_backward(next(batches), 1.0 / cfg.grad_accum_steps)
                loss_value = float(out.loss)
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(step + 1, f"the training loss is {loss_value}", last_checkpoint)
                window_loss += loss_value / cfg.grad_accum_steps
                window_bits += float(out.nll_bits)
                window_bytes += out.n_bytes
                continue
            with autocast():
                out, stats = objective(next(batches), step * cfg.grad_accum_steps + micro, step / cfg.max_steps)
                penalty = telemetry_penalty(out, base.reference_marginals, base.config.bits_per_byte,
                                            lambda_k=cfg.lambda_k, lambda_c=cfg.lambda_c, lambda_s=cfg.lambda_s)
            ((out.loss if penalty is None else out.loss + penalty) / cfg.grad_accum_steps).backward()
            loss_value = float(out.loss.detach())
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(step + 1, f"the training loss is {loss_value}", last_checkpoint)
            if penalty is not None and not math.isfinite(penalty_value := float(penalty.detach())):
                raise NonFiniteLossError(step + 1, f"the telemetry penalty (train.lambda_k/c/s) is {penalty_value}",
                                         last_checkpoint)
            window_loss += loss_value / cfg.grad_accum_steps
            window_bits += float(out.nll_bits)
            window_bytes += out.n_bytes
            for key, value in stats.items():
                window_stats[key] = window_stats.get(key, 0.0) + value / cfg.grad_accum_steps
        grad_norm = strategy.clip_grad_norm(base, cfg.grad_clip) if cfg.grad_clip > 0 else None
        if grad_norm is not None and not math.isfinite(grad_norm := float(grad_norm)):
            raise NonFiniteLossError(step + 1, f"the gradient norm is {grad_norm}", last_checkpoint)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        step += 1
        train_seconds += dt
        window_time += dt
        window_steps += 1
        if bar is not None:
            bar.update(1)

        final = step >= cfg.max_steps or (cfg.max_seconds is not None and train_seconds >= cfg.max_seconds)
        bytes_per_step = cfg.batch_size * context_bytes * cfg.grad_accum_steps * replicas
        bytes_seen += bytes_per_step
        if step % cfg.log_every == 0 or final:
            bytes_per_s = window_steps * bytes_per_step / window_time
            emit({"step": step, "train_seconds": train_seconds, "lr": lr,
                  "train/loss": window_loss / window_steps, "train/bpb": window_bits / max(window_bytes, 1),
                  "bytes_per_s": bytes_per_s, "bits_per_s": bytes_per_s * base.config.bits_per_byte,
                  "grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
                  "bytes_seen": bytes_seen, "bits_seen": bytes_seen * base.config.bits_per_byte,
                  "model/n_parameters": n_parameters}
                 | {f"train/{k}": v / window_steps for k, v in window_stats.items()}, None)
            if bar is not None:
                bar.set_postfix(loss=f"{window_loss / window_steps:.4f}", bpb=f"{window_bits / max(window_bytes, 1):.3f}")
            window_loss, window_bits, window_bytes, window_time, window_steps = 0.0, 0.0, 0, 0.0, 0
            window_stats = {}
        if step % cfg.eval_every == 0 or final:
            metrics = evaluate_fn(base, corpus, eval_cfg, autocast, diffusion) | {
                "step": step, "train_seconds": train_seconds, "bytes_seen": bytes_seen}
            if not math.isfinite(_val_loss(metrics)):
                raise NonFiniteLossError(step, f"the validation loss is {_val_loss(metrics)}", last_checkpoint)
            if data_reference is None or final:  # the data's own C and S: measured once (per context size),
                data_reference = data_reference or _data_reference(base, corpus, eval_cfg)
                metrics |= data_reference  # reported at the first and the last evaluation
            history.append(metrics)
            metrics |= _drift(history, cfg)
            emit(metrics, None)
            if scaling.enabled and not final and detector.update(_val_loss(metrics)):
                grown = grow(base, strategy, scaling, expansions, context_bytes, corpus, step, cfg.seed)
                if grown is not None:
                    base, event = grown
                    if cfg.qat:
                        from .quantization import prepare_qat

                        prepare_qat(base, cfg.qat_group_size)
                    detector.reset()
                    net = strategy.wrap(base)
                    if cfg.compile:
                        net = torch.compile(net)
                    optimizer = build_optimizer(base, cfg)
                    expansions.append(event)
                    n_parameters = event["n_parameters"]
                    if event["kind"] == "context":
                        context_bytes *= 2
                        eval_cfg = dataclasses.replace(eval_cfg, context_bytes=context_bytes)
                        data_reference = None  # longer windows: the data's C and S are measured again
                        batches = make_batches(context_bytes)
                    emit({"step": step, "event": "expand", "scaling/kind": event["kind"],
                          "scaling/expansions": len(expansions), "scaling/logit_change": event["logit_change"],
                          "model/n_parameters": event["n_parameters"], "context_bytes": context_bytes}, None)
                    save(final=False)  # every expansion is a checkpoint
                    continue
        if checkpoint_dir is not None and (final or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
            save(final)
    if bar is not None:
        bar.close()
    return FitResult(step=step, train_seconds=train_seconds, metrics=metrics, history=history,
                     checkpoint=last_checkpoint, model=base, expansions=expansions, data_reference=data_reference or {})


def _read_resume_point(path: Path):
    """(model state, optimizer state, trainer state) and the ModelConfig of a checkpoint, or CheckpointError."""
    try:
        return ckpt.read_checkpoint(path), ckpt.read_config(path)
    except (OSError, ValueError, KeyError, SafetensorError) as err:  # CheckpointError is a ValueError
        where = str(err) if isinstance(err, ckpt.CheckpointError) else f"{path}: {err}"
        raise ckpt.CheckpointError(f"cannot resume from {where}") from None


def _check_context(model, context_bytes: int) -> None:
    ids = context_bytes * model.config.ids_per_byte
    if ids > model.config.max_input_ids:
        raise ValueError(f"train.context_bytes={context_bytes} needs {ids} input ids but the model takes "
                         f"{model.config.max_input_ids} (model.max_seq_len={model.config.max_seq_len})")


def _val_loss(metrics: dict[str, float]) -> float:
    return metrics["val/bpb"] if "val/bpb" in metrics else metrics["val/elbo_bpb"]


def evaluate(model, corpus, cfg: TrainConfig, autocast=None, diffusion: Optional[DiffusionConfig] = None
             ) -> dict[str, float]:
    """Validation bpb (causal) or ELBO bpb (diffusion) over cfg.eval_batches batches, plus K/C/S of the
    model's predictions on the first batch."""
    val = corpus.val if corpus.val.n_windows else corpus.train
    batches = list(val.sequential_batches(cfg.batch_size, cfg.context_bytes, max_batches=cfg.eval_batches))
    if model.config.causal:
        result = evaluate_bpb(model, batches, autocast=autocast)
        scores = {"val/bpb": result["bpb"], "val/n_bytes": result["n_bytes"]}
    else:
        schedule = (diffusion or DiffusionConfig()).noise_schedule
        result = evaluate_elbo(model, batches, schedule=schedule, seed=cfg.seed)
        scores = {"val/elbo_bpb": result["elbo_bpb"], "val/n_bytes": result["n_bytes"]}
    tel = telemetry_means(model, batches[0], seed=cfg.seed)
    return scores | {"val/K": tel["K"], "val/C": tel["C"], "val/S": tel["S"]}


def _data_reference(model, corpus, cfg: TrainConfig) -> dict[str, float]:
    """data/C and data/S: C and S of the first validation batch's own bits (what val/C and val/S predict)."""
    val = corpus.val if corpus.val.n_windows else corpus.train
    first = next(iter(val.sequential_batches(cfg.batch_size, cfg.context_bytes, max_batches=1)))
    return {f"data/{name}": value for name, value in data_telemetry(model, first).items()}


def _drift(history: list[dict[str, float]], cfg: TrainConfig) -> dict[str, float]:
    """Warn (MetricDriftWarning, naming the metric) when val K/C/S drop; returns drift/<metric> deltas either way.

    val K/C/S describe the model's predictions, so they rise while it learns (S from near 0 toward
    data/S); only a drop (predictions losing confidence, collapsing into loops, leaving the corpus'
    byte structure) is worth a warning.
    """
    series = [{k: h[k] for k in TELEMETRY_KEYS if k in h} for h in history]
    drifted = detect_metric_drift(series, window=cfg.drift_window, threshold=cfg.drift_threshold)
    for name, delta in drifted.items():
        if delta >= 0:
            continue
        warnings.warn(f"{name} drifted by {delta:+.3f} (mean of the last {cfg.drift_window} evaluations vs "
                      f"the {cfg.drift_window} before; threshold {cfg.drift_threshold})", MetricDriftWarning,
                      stacklevel=3)
    return {f"drift/{name}": delta for name, delta in drifted.items()}


def _progress_bar(enabled: bool, cfg: TrainConfig, start: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, initial=start, unit="step", dynamic_ncols=True)
