"""Validation during training: bpb or ELBO bpb, K/C/S of the predictions, the data's own C and S, drift warnings."""

from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch

from .config import DiffusionConfig, TrainConfig
from .diffusion import evaluate_elbo
from .evaluation import data_telemetry, prediction_telemetry
from .objective import evaluate_bpb
from .strategy import Strategy
from .telemetry import detect_metric_drift

TELEMETRY_KEYS = ("val/K", "val/C", "val/S")  # of the model's predictions; data/C and data/S are the data's


class MetricDriftWarning(UserWarning):
    """A validation telemetry metric moved by more than train.drift_threshold between windows."""


def telemetry_means(model, byte_batch: torch.Tensor, *, seed: int = 0) -> dict[str, float]:
    """Mean K, C, S of what the model predicts for one byte batch (bitlm.evaluation.prediction_telemetry)."""
    return prediction_telemetry(model, byte_batch, seed=seed)


def validation_batches(corpus, cfg: TrainConfig, max_batches: int) -> list[torch.Tensor]:
    """The first `max_batches` (B, L) batches of the validation split (the training split when it is empty)."""
    val = corpus.val if corpus.val.n_windows else corpus.train
    return list(val.sequential_batches(cfg.batch_size, cfg.context_bytes, max_batches=max_batches))


def evaluate(model, corpus, cfg: TrainConfig, autocast=None, diffusion: Optional[DiffusionConfig] = None, *,
             strategy: Optional[Strategy] = None) -> dict[str, float]:
    """Validation bpb (causal) or ELBO bpb (diffusion) over cfg.n_eval_batches batches, plus K/C/S of the
    model's predictions on the first batch; the same numbers on every rank of `strategy`."""
    strategy = strategy or Strategy()
    batches = validation_batches(corpus, cfg, cfg.n_eval_batches)
    if model.config.causal:
        logits_of = functools.partial(strategy.eval_logits, model)
        result = evaluate_bpb(model, batches, autocast=autocast, logits_of=logits_of)
        tel = prediction_telemetry(model, batches[0], seed=cfg.seed, logits_of=logits_of)
        if tel is None:  # a rank without logits (a pipeline's earlier stages): the last one's numbers
            return strategy.share(None)
        scores = {"val/bpb": result["bpb"], "val/n_bytes": result["n_bytes"]}
    else:
        schedule = (diffusion or DiffusionConfig()).noise_schedule
        result = evaluate_elbo(model, batches, schedule=schedule, seed=cfg.seed)
        scores = {"val/elbo_bpb": result["elbo_bpb"], "val/n_bytes": result["n_bytes"]}
        tel = telemetry_means(model, batches[0], seed=cfg.seed)
    return strategy.share(scores | {"val/K": tel["K"], "val/C": tel["C"], "val/S": tel["S"]})


def data_reference(model, corpus, cfg: TrainConfig) -> dict[str, float]:
    """data/C and data/S: C and S of the first validation batch's own bits (what val/C and val/S predict)."""
    first = validation_batches(corpus, cfg, 1)[0]
    return {f"data/{name}": value for name, value in data_telemetry(model, first).items()}


def val_loss(metrics: dict[str, float]) -> float:
    return metrics["val/bpb"] if "val/bpb" in metrics else metrics["val/elbo_bpb"]


def drift(history: list[dict[str, float]], cfg: TrainConfig) -> dict[str, float]:
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


