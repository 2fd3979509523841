"""What a training run reports and returns: the report callback, the statistics window, the result, the non-finite stop."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .objective import LossOutput

Report = Callable[[dict[str, Any], Optional[Path]], None]
"""Called with (metrics, checkpoint directory or None) at every log, eval, scaling and checkpoint event.

Every rank calls it the same number of times (Ray Train's rule); only the checkpoint writer
passes a directory. A scaling event carries metrics["event"] == "expand" and "scaling/kind".
"""


class NonFiniteLossError(RuntimeError):
    """Training met a non-finite loss, gradient norm or weights and stopped; no checkpoint of them was written."""

    def __init__(self, step: int, what: str, checkpoint: Optional[Path]):
        self.step, self.what, self.checkpoint = step, what, checkpoint
        kept = f"the last good checkpoint is {checkpoint}" if checkpoint is not None else "no checkpoint was written"
        super().__init__(f"training step {step}: {what}; training stopped and {kept} "
                         "(a smaller train.lr, train.lambda_k/c/s or train.grad_clip usually helps)")

    def __reduce__(self):  # Ray sends a worker's exception to the driver pickled; rebuild it from its fields
        return (type(self), (self.step, self.what, self.checkpoint))


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


@dataclass
class Window:
    """Training statistics summed since the last log line."""

    stats: dict[str, float] = field(default_factory=dict)  # per-step means of objective statistics (compression)
    loss: float = 0.0
    bits: float = 0.0
    n_bytes: int = 0
    seconds: float = 0.0
    n_steps: int = 0

    def add(self, out: LossOutput, loss_value: float, share: float, stats: dict[str, float]) -> None:
        self.loss += loss_value * share
        self.bits += float(out.nll_bits)
        self.n_bytes += out.n_bytes
        for key, value in stats.items():
            self.stats[key] = self.stats.get(key, 0.0) + value * share
