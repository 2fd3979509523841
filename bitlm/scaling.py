"""Progressive scaling: function-preserving growth of a BitTransformerLM and when to grow it.

Three expansions, each returning a new model whose logits equal the old one's at the moment of
growth, so training continues from the same loss instead of a spike:
  depth    append blocks whose residual-writing projections (attn.proj, mlp[2]) are zero: each is
           the identity in the plain stack (x + f(x), then + g) and in the reversible coupling
           (y1 = x1 + f(x2), y2 = x2 + g(y1));
  width    double d_ff: new hidden units read the input through random rows of mlp[0] but write
           through zero columns of mlp[2], so they add nothing until trained;
  context  double max_positions: positions are a fixed sinusoidal table whose existing rows do not
           depend on its length, and no parameter depends on it.
Width means d_ff, not d_model: every block is pre-norm, and a LayerNorm over a vector padded with
zero features has a different mean and variance than over the original, so no zero padding of
d_model leaves the normalised activations (and hence the logits) unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Optional

import torch
from torch import nn

from .blocks import Block
from .config import ExpansionKind, ModelConfig, ScalingConfig
from .model import BitTransformerLM
from .objective import model_inputs

INIT_STD = 0.02  # the std of bitlm.model's weight init, used for the new weights too
EXPANSION_KINDS: tuple[str, ...] = typing.get_args(ExpansionKind)


def expanded_config(cfg: ModelConfig, kind: str, *, add_layers: int = 1) -> ModelConfig:
    """The model config after one expansion of `kind` (depth, width or context)."""
    if kind == "depth":
        if cfg.act:
            raise ValueError("model.act: adding layers changes the ACT halting mixture, so a depth expansion "
                             "would not preserve the model's function")
        if add_layers < 1:
            raise ValueError(f"add_layers: must be >= 1, got {add_layers}")
        return dataclasses.replace(cfg, n_layers=cfg.n_layers + add_layers)
    if kind == "width":
        return dataclasses.replace(cfg, d_ff=2 * cfg.d_ff)
    if kind == "context":
        return dataclasses.replace(cfg, max_positions=2 * cfg.max_positions)
    raise ValueError(f"expansion kind: must be one of {list(EXPANSION_KINDS)}, got {kind!r}")


def expand_model(model: BitTransformerLM, kind: str, *, add_layers: int = 1,
                 generator: Optional[torch.Generator] = None) -> BitTransformerLM:
    """A new, larger model with `model`'s logits, device, dtype and mode; `model` is left untouched."""
    # new random weights come from `generator` (the global RNG when None): ranks that seed it alike
    # build identical models without broadcasting weights
    if not isinstance(model, BitTransformerLM):
        raise TypeError(f"expand_model takes a BitTransformerLM (unwrap DDP/compile first), got {type(model).__name__}")
    new_cfg = expanded_config(model.config, kind, add_layers=add_layers)
    reference = next(model.parameters())
    # build in fp32 on the CPU with a forked RNG: the constructor's own random init is overwritten
    # below and must not advance the caller's global RNG stream
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        new = BitTransformerLM(new_cfg)
    with torch.no_grad():
        copy_weights_into(new, model.state_dict())
        if kind == "depth":
            for block in new.body.stack.blocks[model.config.n_layers:]:
                _init_identity_block(block, generator)
        elif kind == "width":
            d_ff = model.config.d_ff
            for block in new.body.stack.blocks:
                up, down = block.mlp[0], block.mlp[2]
                rows = d_ff * up.out_features // new_cfg.d_ff  # swiglu: 2 rows per unit (gate, value)
                up.weight[rows:] = init_normal(up.weight[rows:].shape, generator)
                up.bias[rows:] = 0.0
                down.weight[:, d_ff:] = 0.0  # the new units write nothing until trained
    new.to(device=reference.device, dtype=reference.dtype)
    return new.train(model.training)


def copy_weights_into(new: nn.Module, old_state: dict[str, torch.Tensor]) -> None:
    """Copy each old tensor into the leading slice of the same-named new tensor."""
    new_state = new.state_dict()
    for name, old in old_state.items():
        if name not in new_state:
            raise ValueError(f"expanded model has no tensor {name!r}")
        target = new_state[name]
        if target.dim() != old.dim() or any(n < o for n, o in zip(target.shape, old.shape)):
            raise ValueError(f"{name}: cannot place {tuple(old.shape)} into {tuple(target.shape)}")
        target[tuple(slice(0, n) for n in old.shape)] = old.to(target.dtype)


def init_normal(shape: torch.Size, generator: Optional[torch.Generator]) -> torch.Tensor:
    # draw on the generator's device (a CUDA generator cannot fill a CPU tensor), then copy
    device = generator.device if generator is not None else "cpu"
    return torch.empty(shape, device=device).normal_(0.0, INIT_STD, generator=generator).cpu()


def _init_identity_block(block: Block, generator: Optional[torch.Generator]) -> None:
    for module in block.modules():
        if isinstance(module, nn.Linear):
            module.weight.copy_(init_normal(module.weight.shape, generator))
            nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            module.reset_parameters()
    # zero residual writers make f and g output exactly 0; reads stay random so gradients reach them
    for linear in (block.attn.proj, block.mlp[2]):
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)


class PlateauDetector:
    """Flags a plateau when validation loss stops improving between two consecutive windows."""

    def __init__(self, window: int, improve_thresh: float):
        if window < 1:
            raise ValueError(f"window: must be >= 1, got {window}")
        if improve_thresh < 0:
            raise ValueError(f"improve_thresh: must be >= 0, got {improve_thresh}")
        self.window = window
        self.improve_thresh = improve_thresh
        self.history: list[float] = []

    def update(self, val_loss: float) -> bool:
        """Record one evaluation; True when the last window improved on the one before by < improve_thresh."""
        self.history.append(float(val_loss))
        self.history = self.history[-2 * self.window:]  # older values never enter the comparison
        return self.relative_improvement() < self.improve_thresh if self._full() else False

    def relative_improvement(self) -> float:
        """(mean of previous window - mean of last window) / |mean of previous window|; nan until 2 windows."""
        if not self._full():
            return math.nan
        previous = sum(self.history[:self.window]) / self.window
        last = sum(self.history[self.window:]) / self.window
        return (previous - last) / max(abs(previous), 1e-12)  # a zero loss cannot improve: no division by 0

    def reset(self) -> None:
        """Forget the history, e.g. after an expansion changed the loss curve."""
        self.history = []

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "improve_thresh": self.improve_thresh, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window = int(state["window"])
        self.improve_thresh = float(state["improve_thresh"])
        self.history = [float(v) for v in state["history"]][-2 * self.window:]

    def _full(self) -> bool:
        return len(self.history) >= 2 * self.window


def next_expansion(cfg: ScalingConfig, n_done: int) -> str:
    """The kind of the expansion after `n_done` earlier ones: cfg.kinds in a cycle."""
    kinds = cfg.kinds
    return kinds[n_done % len(kinds)]


def count_parameters(model_cfg: ModelConfig) -> int:
    """Parameters of a model of this config, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        return BitTransformerLM(model_cfg).num_parameters()


def can_expand(model_cfg: ModelConfig, kind: str, cfg: ScalingConfig, context_bytes: int) -> tuple[bool, str]:
    """Whether a `kind` expansion stays within cfg.max_parameters and cfg.max_context_bytes, and why not."""
    # cfg.max_expansions is the caller's check: it is the one counting expansions
    try:
        grown = expanded_config(model_cfg, kind, add_layers=cfg.n_added_layers)
    except ValueError as err:
        return False, str(err)
    if kind == "context" and 2 * context_bytes > cfg.max_context_bytes:
        return False, (f"context expansion to {2 * context_bytes} bytes exceeds "
                       f"scaling.max_context_bytes={cfg.max_context_bytes}")
    n_params = count_parameters(grown)
    if n_params > cfg.max_parameters:
        return False, (f"{kind} expansion to {n_params:,} parameters exceeds "
                       f"scaling.max_parameters={cfg.max_parameters:,}")
    return True, ""


def expanded_lr_scale(cfg: ScalingConfig, n_expansions: int, steps_since_expansion: int) -> float:
    """Learning-rate multiplier: lr_decay ** -n_expansions times a linear re-warm-up after the last expansion."""
    if n_expansions == 0:
        return 1.0
    warm = 1.0 if cfg.rewarm_steps == 0 else min(1.0, (steps_since_expansion + 1) / cfg.rewarm_steps)
    return cfg.lr_decay ** -n_expansions * warm


def grown_from(requested, saved) -> bool:
    """Whether `saved` is `requested` after progressive-scaling expansions (deeper, wider, longer only)."""
    grown = ("n_layers", "d_ff", "max_positions")
    same = dataclasses.replace(saved, **{k: getattr(requested, k) for k in grown}) == requested
    return same and all(getattr(saved, k) >= getattr(requested, k) for k in grown)


def grow(base, strategy, scaling: ScalingConfig, expansions: list, context_bytes: int, corpus, step: int,
         seed: int):
    """Grow the model one step of the cycle if the bounds allow; returns (new model, event) or None.

    Every rank builds the same grown model: the full weights are gathered, and new weights come
    from a generator seeded by the run's seed and the expansion count.
    """
    if len(expansions) >= scaling.max_expansions:
        return None
    kind = next_expansion(scaling, len(expansions))
    ok, _ = can_expand(base.config, kind, scaling, context_bytes)
    if not ok or (kind == "context" and 2 * context_bytes > corpus.train.window_bytes):
        return None
    plain = strategy.unwrapped(base)
    generator = torch.Generator().manual_seed(seed * 7919 + len(expansions) + 1)
    grown = expand_model(plain, kind, add_layers=scaling.n_added_layers, generator=generator)
    # function preservation, measured on a validation batch: the logits before and after growth
    probe = next(iter(corpus.val.sequential_batches(2, context_bytes, max_batches=1)))
    with torch.no_grad():
        was = plain.training, grown.training
        plain.eval(), grown.eval()
        ids = model_inputs(plain, probe.to(next(plain.parameters()).device))
        change = float((plain(ids)[0].float() - grown(ids)[0].float()).abs().max())
        plain.train(was[0]), grown.train(was[1])
    event = {"kind": kind, "step": step, "logit_change": change, "n_parameters": grown.num_parameters(),
             "n_layers": grown.config.n_layers, "d_ff": grown.config.d_ff, "max_positions": grown.config.max_positions}
    return grown, event
