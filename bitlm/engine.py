"""The training loop: restore, train steps, evaluate-and-grow, save (torchtitan's trainer, for one rank).

`fit` takes the whole experiment (an ExperimentConfig) and a Strategy (bitlm.strategy) that says
how this rank holds the model; `Trainer` holds the run's state between its steps.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from safetensors import SafetensorError

from . import checkpoint as ckpt
from .config import ExperimentConfig, TrainConfig, to_dict
from .diffusion import check_diffusion_model, corrupt, diffusion_loss
from .objective import (COMPRESSED_STREAM, LossOutput, causal_loss, compressed_rows, model_inputs,
                        scored_logits, stream_loss, telemetry_penalty)
from .optim import autocast_factory, build_optimizer, lr_factor, resolve_device, set_lr  # noqa: F401  (re-exported)
from .parallel import parallelize
from .progress import FitResult, NonFiniteLossError, Report, Window
from .scaling import PlateauDetector, expanded_lr_scale, grow, grown_from
from .strategy import Strategy
from .validation import (MetricDriftWarning, data_reference, drift, evaluate, telemetry_means,  # noqa: F401
                         val_loss)


def compress_probability(cfg: TrainConfig, step: int) -> float:
    """cfg.compress_prob after the warm-up and linear ramp: 0 before compress_warmup_steps."""
    if cfg.compress_prob == 0 or step < cfg.compress_warmup_steps:
        return 0.0
    if cfg.compress_ramp_steps == 0:
        return cfg.compress_prob
    return cfg.compress_prob * min(1.0, (step - cfg.compress_warmup_steps + 1) / cfg.compress_ramp_steps)


def fit(model, corpus, cfg: ExperimentConfig | TrainConfig, *, strategy: Optional[Strategy] = None,
        report: Optional[Report] = None, checkpoint_dir: Optional[str | Path] = None,
        resume_from: Optional[str | Path] = "latest", device: Optional[str | torch.device] = None,
        progress: bool = False, loss: Optional[Callable[[Any, torch.Tensor], LossOutput]] = None) -> FitResult:
    """Train `model` on `corpus` (a bitlm.data.Corpus) following the experiment `cfg`.

    cfg: its train, diffusion, scaling and parallel sections drive the run (the model is the one
    given); a bare TrainConfig is the train section of an experiment with default other sections.
    A causal model learns next-bit prediction; a non-causal one learns masked diffusion per
    cfg.diffusion (its loss is the ELBO, evaluated as val/elbo_bpb, an upper bound on bpb).

    With `checkpoint_dir`, the writer rank saves step-NNNNNNNN/ checkpoints there; training
    continues from `resume_from`: "latest" (the newest checkpoint in checkpoint_dir), a checkpoint
    directory, or None (a fresh start). Same data order, optimizer and RNG state, so the loss curve
    is the one an uninterrupted run would have produced. A damaged newer checkpoint is skipped with
    a CheckpointWarning (none loadable: CheckpointError), and temp directories that a kill during a
    save left behind are removed first.

    A non-finite loss, gradient norm, validation loss or weight stops training with
    NonFiniteLossError before anything of it is saved; the checkpoints on disk stay the good ones.

    `strategy` (bitlm.parallel.make_strategy) says how this rank holds the model (DDP, FSDP, a
    pipeline stage) and gives the rank and world size. cfg.scaling grows the model when the
    validation loss plateaus (bitlm.scaling); the grown model is FitResult.model.
    `loss(net, byte_batch)` replaces the causal loss as a causal model's training objective
    (bitlm.distill's distillation loss); evaluation still scores the plain causal loss.
    """
    if isinstance(cfg, TrainConfig):
        cfg = ExperimentConfig(model=model.config, train=cfg)
    trainer = Trainer(model, corpus, cfg, strategy=strategy or Strategy(), report=report,
                      checkpoint_dir=checkpoint_dir, device=resolve_device(device), loss=loss)
    trainer.restore(resume_from)
    trainer.start()
    bar = _progress_bar(progress, trainer.cfg, trainer.step)
    while not trainer.done():
        trainer.train_step()
        final = trainer.done()
        logged = trainer.log(final)
        if bar is not None:
            bar.update(1)
            if logged is not None:  # the log window's means: one step's loss is too noisy to read
                bar.set_postfix(loss=f"{logged['train/loss']:.4f}", bpb=f"{logged['train/bpb']:.3f}")
        if trainer.due("eval_every_steps", final) and trainer.evaluate_and_grow(final):
            continue  # an expansion is a checkpoint of its own
        if checkpoint_dir is not None and (final or trainer.due("checkpoint_every_steps", final=False)):
            trainer.save(final)
    if bar is not None:
        bar.close()
    return trainer.result()


class Trainer:
    """One rank's training run: the model, its optimizer and everything a checkpoint restores."""

    def __init__(self, model, corpus, cfg: ExperimentConfig, *, strategy: Strategy, report: Optional[Report],
                 checkpoint_dir: Optional[str | Path], device: torch.device, loss=None):
        self.base, self.corpus, self.exp, self.cfg = model, corpus, cfg, cfg.train
        self.strategy, self.device, self.custom_loss = strategy, device, loss
        self.emit = report or (lambda metrics, path: None)
        self.checkpoint_dir = checkpoint_dir
        self.step, self.train_seconds, self.history, self.expansions = 0, 0.0, [], []
        self.context_bytes = cfg.train.context_bytes
        self.saved, self.last_checkpoint = None, None
        self.detector = PlateauDetector(cfg.scaling.n_plateau_evals, cfg.scaling.improve_thresh) if cfg.scaling.enabled else None
        self.data_reference: Optional[dict[str, float]] = None
        self.window, self.last_loss, self.grad_norm, self.lr = Window(), math.nan, None, cfg.train.lr
        # Data-parallel ranks each take batch_size rows of one global batch drawn as a single process
        # would draw batch_size * world_size rows, so a W-worker run sees exactly the batches of a
        # 1-worker run with a W times larger batch. A pipeline feeds one batch through all ranks.
        self.replicas = strategy.n_replicas
        torch.manual_seed(cfg.train.seed)

    def restore(self, resume_from: Optional[str | Path]) -> None:
        """Read the checkpoint to resume from (its tensors are loaded in start, after wrapping)."""
        if self.checkpoint_dir is not None and self.strategy.writes_checkpoints:
            ckpt.remove_stale_temporaries(self.checkpoint_dir)  # left by a kill during a save; the one writer
        if resume_from == "latest":
            resume_from = ckpt.latest_checkpoint(self.checkpoint_dir) if self.checkpoint_dir else None
        if resume_from is None:
            return
        latest = self.last_checkpoint = Path(resume_from)
        self.saved, saved_config = _read_resume_point(latest)
        trainer = self.saved[2]
        self.step, self.train_seconds, self.history = trainer["step"], trainer["train_seconds"], trainer["history"]
        self.expansions = trainer.get("expansions", [])
        self.context_bytes = trainer.get("context_bytes", self.context_bytes)
        if self.detector is not None and "plateau" in trainer:
            self.detector.load_state_dict(trainer["plateau"])
        if saved_config != self.base.config:
            if not grown_from(self.base.config, saved_config):
                raise ValueError(f"{latest}: the checkpoint holds a different model ({saved_config}) than the one "
                                 f"requested ({self.base.config}); start a new run (another name or directory)")
            self.base = type(self.base)(saved_config)  # the run grew before it stopped: continue with the grown shape

    def start(self) -> None:
        """Check the run, place and wrap the model, build the optimizer and load the resumed state."""
        base, cfg, strategy = self.base.to(self.device), self.cfg, self.strategy
        self.base = base
        _check_context(base, self.context_bytes)
        # S compares bits with the corpus for either representation (the byte model's bytes as bits)
        base.set_reference_marginals(self.corpus.phase_marginals(base.config.parity))
        strategy.check(base, cfg, self.exp.diffusion)
        if not base.config.causal:
            check_diffusion_model(base.config)
        if self.detector is not None and strategy.name == "pipeline":
            raise ValueError("scaling.enabled: progressive scaling is not available with the pipeline strategy")
        if self.custom_loss is not None and (not base.config.causal or cfg.compress_prob > 0 or strategy.owns_backward):
            raise ValueError("fit(loss=...): a custom objective needs a causal model, train.compress_prob=0 and a "
                             "strategy that leaves the backward pass to fit (not the pipeline strategy)")
        if cfg.compress_prob > 0 and (base.config.n_streams < 2 or not base.config.causal):
            raise ValueError("train.compress_prob > 0 needs a causal model with model.n_streams >= 2 "
                             f"(got n_streams={base.config.n_streams}, causal={base.config.causal})")
        self._prepare_qat()
        self.n_parameters = base.num_parameters()  # of the whole model, before a strategy shards or splits it
        self._build()
        if self.saved is not None:
            strategy.load_full_state(base, self.optimizer, self.saved[0], self.saved[1])
            ckpt.restore_rng(self.last_checkpoint)
            self.saved = None
        self.autocast = autocast_factory(cfg.precision, self.device)
        self.bytes_seen = float(self.history[-1].get("bytes_seen", 0)) if self.history else 0.0
        self.metrics: dict[str, float] = self.history[-1] if self.history else {}
        self._set_context(self.context_bytes)
        self.base.train()

    def _prepare_qat(self) -> None:
        """train.qat: fake-quantize the linear layers, before the optimizer and any wrapper see them."""
        if self.cfg.qat:
            from .quantization import prepare_qat

            prepare_qat(self.base, self.cfg.qat_group_size)

    def _build(self) -> None:
        parallel = self.exp.parallel
        self.net = parallelize(self.base, self.strategy, activation_checkpointing=parallel.activation_checkpointing,
                               compile=self.cfg.compile)
        self.optimizer = build_optimizer(self.base, self.cfg)

    def _set_context(self, context_bytes: int) -> None:
        self.context_bytes = context_bytes
        # every rank scores the same n_eval_batches global batches: W workers evaluate what one worker with
        # a W-times batch evaluates, so their curves are comparable
        self.eval_cfg = dataclasses.replace(self.cfg, context_bytes=context_bytes,
                                            batch_size=self.cfg.batch_size * self.replicas)
        drawn = self.corpus.train.random_batches(self.cfg.batch_size * self.replicas, context_bytes,
                                                 seed=self.cfg.seed, start_step=self.step * self.cfg.grad_accum_steps)
        rank, size = self.strategy.rank, self.cfg.batch_size
        self.batches = drawn if self.replicas == 1 else (b[rank * size:(rank + 1) * size] for b in drawn)

    def done(self) -> bool:
        cfg = self.cfg
        return self.step >= cfg.max_steps or (cfg.max_seconds is not None and self.train_seconds >= cfg.max_seconds)

    def due(self, every: str, final: bool) -> bool:
        """Whether the step just taken is one of every `train.<every>` steps (or the final one)."""
        n = getattr(self.cfg, every)
        return final or bool(n and self.step % n == 0)

    def objective(self, batch: torch.Tensor, micro_index: int, progress: float) -> tuple[LossOutput, dict]:
        """The training loss of one micro-batch and its statistics (compression-aware training's)."""
        cfg, mc, net = self.cfg, self.base.config, self.net
        if not mc.causal:
            # one generator per micro-batch, seeded by its index, keeps resumed runs exact
            noise = torch.Generator().manual_seed(cfg.seed * 1_000_003 + micro_index)
            noised = corrupt(mc, batch.to(self.device), schedule=self.exp.diffusion.noise_schedule, generator=noise,
                             progress=progress, curriculum=self.exp.diffusion.curriculum)
            logits, _ = net(noised.inputs, causal=False, **noised.forward_kwargs())
            return diffusion_loss(logits, noised, mc.bits_per_byte), {}
        if self.custom_loss is not None:
            return self.custom_loss(net, batch), {}
        p = compress_probability(cfg, micro_index // cfg.grad_accum_steps)
        picked = np.random.default_rng([cfg.seed, micro_index, 7]).random(batch.shape[0]) < p if p else None
        if picked is None or not picked.any():
            return self._causal(batch), ({} if picked is None else {"compressed_fraction": 0.0})
        ids, mask, ratio = compressed_rows(batch[torch.from_numpy(picked)], mc.parity)
        ids, mask = ids.to(self.device), mask.to(self.device)
        stream = torch.full((ids.shape[0],), COMPRESSED_STREAM, device=self.device)
        compressed = stream_loss(net(ids, causal=True, stream=stream)[0], ids, mask)
        stats = {"compressed_fraction": float(picked.mean()), "compression_ratio": ratio}
        if picked.all():
            zero = compressed.new_zeros(())
            return LossOutput(loss=compressed, nll_bits=zero.detach(), n_bytes=0), stats
        text = self._causal(batch[torch.from_numpy(~picked)])
        mixed = (text.loss * (~picked).sum() + compressed * picked.sum()) / batch.shape[0]
        return dataclasses.replace(text, loss=mixed), stats

    def _causal(self, batch: torch.Tensor) -> LossOutput:
        ids = model_inputs(self.base.config, batch.to(self.device))
        return causal_loss(scored_logits(self.net, ids, self.base.config), ids, self.base.config)

    def train_step(self) -> None:
        """One optimizer step over grad_accum_steps micro-batches."""
        cfg, strategy = self.cfg, self.strategy
        t0 = time.perf_counter()
        self.lr = cfg.lr * lr_factor(cfg, self.step, self.train_seconds)
        if self.expansions:
            self.lr *= expanded_lr_scale(self.exp.scaling, len(self.expansions), self.step - self.expansions[-1]["step"])
        set_lr(self.optimizer, self.lr)  # Muon's groups (train.optimizer='muon') take muon_lr times the same factor
        for micro in range(cfg.grad_accum_steps):
            stats = {}
            if strategy.owns_backward:
                with self.autocast():
                    out = strategy.forward_backward(next(self.batches), 1.0 / cfg.grad_accum_steps)
                self._check_finite(float(out.loss), "the training loss")
            else:
                with self.autocast():
                    out, stats = self.objective(next(self.batches), self.step * cfg.grad_accum_steps + micro,
                                                self.step / cfg.max_steps)
                    penalty = telemetry_penalty(out, self.base.reference_marginals, self.base.config.bits_per_byte,
                                                lambda_k=cfg.lambda_k, lambda_c=cfg.lambda_c, lambda_s=cfg.lambda_s)
                ((out.loss if penalty is None else out.loss + penalty) / cfg.grad_accum_steps).backward()
                self._check_finite(float(out.loss.detach()), "the training loss")
                if penalty is not None:
                    self._check_finite(float(penalty.detach()), "the telemetry penalty (train.lambda_k/c/s)")
            self.last_loss = float(out.loss.detach())
            self.window.add(out, self.last_loss, 1.0 / cfg.grad_accum_steps, stats)
        self.grad_norm = strategy.clip_grad_norm(self.base, cfg.grad_clip) if cfg.grad_clip > 0 else None
        if self.grad_norm is not None:
            self.grad_norm = float(self.grad_norm)
            self._check_finite(self.grad_norm, "the gradient norm")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        self.step += 1
        self.train_seconds += dt
        self.window.seconds += dt
        self.window.n_steps += 1
        self.bytes_per_step = cfg.batch_size * self.context_bytes * cfg.grad_accum_steps * self.replicas
        self.bytes_seen += self.bytes_per_step

    def _check_finite(self, value: float, what: str) -> None:
        if not math.isfinite(value):
            raise NonFiniteLossError(self.step + 1, f"{what} is {value}", self.last_checkpoint)

    def log(self, final: bool) -> Optional[dict[str, float]]:
        """Report the window's training metrics every train.log_every_steps steps and at the end; returns them."""
        if not self.due("log_every_steps", final):
            return None
        w, bpb = self.window, self.base.config.bits_per_byte
        bytes_per_s = w.n_steps * self.bytes_per_step / w.seconds
        metrics = {"step": self.step, "train_seconds": self.train_seconds, "lr": self.lr,
                   "train/loss": w.loss / w.n_steps, "train/bpb": w.bits / max(w.n_bytes, 1),
                   "bytes_per_s": bytes_per_s, "bits_per_s": bytes_per_s * bpb,
                   "grad_norm": self.grad_norm if self.grad_norm is not None else 0.0,
                   "bytes_seen": self.bytes_seen, "bits_seen": self.bytes_seen * bpb,
                   "model/n_parameters": self.n_parameters}
        metrics |= {f"train/{k}": v / w.n_steps for k, v in w.stats.items()}
        self.emit(metrics, None)
        self.window = Window()
        return metrics

    def evaluate_and_grow(self, final: bool) -> bool:
        """Evaluate, warn on drift and, on a plateau, grow the model; True when it grew (and was saved)."""
        metrics = evaluate(self.base, self.corpus, self.eval_cfg, self.autocast, self.exp.diffusion,
                           strategy=self.strategy)
        metrics |= {"step": self.step, "train_seconds": self.train_seconds, "bytes_seen": self.bytes_seen}
        if not math.isfinite(val_loss(metrics)):
            raise NonFiniteLossError(self.step, f"the validation loss is {val_loss(metrics)}", self.last_checkpoint)
        if self.data_reference is None or final:  # the data's own C and S: measured once (per context size),
            self.data_reference = self.data_reference or data_reference(self.base, self.corpus, self.eval_cfg)
            metrics |= self.data_reference  # reported at the first and the last evaluation
        self.history.append(metrics)
        metrics |= drift(self.history, self.cfg)
        self.metrics = metrics
        self.emit(metrics, None)
        if self.detector is None or final or not self.detector.update(val_loss(metrics)):
            return False
        grown = grow(self.base, self.strategy, self.exp.scaling, self.expansions, self.context_bytes, self.corpus,
                     self.step, self.cfg.seed)
        if grown is None:
            return False
        self.base, event = grown
        self._prepare_qat()
        self.detector.reset()
        self._build()
        self.expansions.append(event)
        self.n_parameters = event["n_parameters"]
        if event["kind"] == "context":
            self._set_context(self.context_bytes * 2)
            self.data_reference = None  # longer windows: the data's C and S are measured again
        self.emit({"step": self.step, "event": "expand", "scaling/kind": event["kind"],
                   "scaling/expansions": len(self.expansions), "scaling/logit_change": event["logit_change"],
                   "model/n_parameters": event["n_parameters"], "context_bytes": self.context_bytes}, None)
        self.save(final=False)  # every expansion is a checkpoint
        return True

    def save(self, final: bool) -> None:
        """Gather the full state (every rank), write a checkpoint (the writer) and report it."""
        if self.checkpoint_dir is None:
            return
        gathered = self.strategy.full_state(self.base, self.optimizer)  # collective: every rank takes part
        path = None
        if self.strategy.writes_checkpoints:
            bad = _non_finite_weight(gathered[0] if gathered is not None else self.base.state_dict())
            if bad is not None:
                raise NonFiniteLossError(self.step, f"weight {bad} is not finite after the optimizer step",
                                         self.last_checkpoint)
            trainer = {"step": self.step, "train_seconds": self.train_seconds, "history": self.history,
                       "train": to_dict(self.cfg), "context_bytes": self.context_bytes, "expansions": self.expansions}
            if self.detector is not None:
                trainer["plateau"] = self.detector.state_dict()
            path = self.last_checkpoint = ckpt.save_checkpoint(ckpt.step_directory(self.checkpoint_dir, self.step),
                                                               self.base, self.optimizer, trainer, state=gathered)
            ckpt.prune_checkpoints(self.checkpoint_dir, self.cfg.n_checkpoints_kept)
        self.emit({"step": self.step, "final": final}, path)

    def result(self) -> FitResult:
        return FitResult(step=self.step, train_seconds=self.train_seconds, metrics=self.metrics, history=self.history,
                         checkpoint=self.last_checkpoint, model=self.base, expansions=self.expansions,
                         data_reference=self.data_reference or {})


def _non_finite_weight(state: dict[str, torch.Tensor]) -> Optional[str]:
    """The name of the first floating-point tensor of `state` holding a nan or inf, or None."""
    for name, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


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
                         f"{model.config.max_input_ids} (model.max_positions={model.config.max_positions})")


def _progress_bar(enabled: bool, cfg: TrainConfig, start: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, initial=start, unit="step", dynamic_ncols=True)
