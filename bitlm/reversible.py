"""RevNet coupling over a stack of blocks with activations rebuilt in backward (O(1) memory in depth)."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn


class RngState:
    """The CPU (and current CUDA device) generator state, so dropout masks can be replayed."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


class _AutocastState:
    """The autocast setting active in forward, re-entered while recomputing in backward."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.enabled = torch.is_autocast_enabled(device_type)
        self.dtype = torch.get_autocast_dtype(device_type)

    def context(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


class _ReversibleStack(torch.autograd.Function):
    """y1 = x1 + F(x2); y2 = x2 + G(y1), per block; only the last (y1, y2) is kept for backward."""

    @staticmethod
    def forward(ctx, x1, x2, blocks, causal, replay_rng, *params):
        ctx.blocks, ctx.causal = blocks, causal
        ctx.autocast = _AutocastState(x1.device.type)
        ctx.rng = []
        with torch.no_grad():
            for block in blocks:
                rng_f = RngState(x1.device) if replay_rng else None
                y1 = x1 + block.f(x2, causal=causal)
                rng_g = RngState(x1.device) if replay_rng else None
                x2 = x2 + block.g(y1)
                x1 = y1
                ctx.rng.append((rng_f, rng_g))
        ctx.save_for_backward(x1.detach(), x2.detach())
        return x1, x2

    @staticmethod
    def backward(ctx, dy1, dy2):
        y1, y2 = ctx.saved_tensors
        param_grads: list[torch.Tensor | None] = []
        for block, (rng_f, rng_g) in reversed(list(zip(ctx.blocks, ctx.rng))):
            f_params, g_params = block.f_parameters(), block.g_parameters()
            # y2 = x2 + G(y1): rebuild x2, and the gradient reaching y1 through G
            with torch.enable_grad(), ctx.autocast.context():
                z1 = y1.detach().requires_grad_(True)
                with _maybe_replay(rng_g):
                    g_out = block.g(z1)
                grads = torch.autograd.grad(g_out, [z1, *g_params], dy2, allow_unused=True)
            dz1 = dy1 + grads[0]
            g_grads = list(grads[1:])
            x2 = (y2 - g_out.detach()).detach()
            # y1 = x1 + F(x2): rebuild x1, and the gradient reaching x2 through F
            with torch.enable_grad(), ctx.autocast.context():
                x2_ = x2.requires_grad_(True)
                with _maybe_replay(rng_f):
                    f_out = block.f(x2_, causal=ctx.causal)
                grads = torch.autograd.grad(f_out, [x2_, *f_params], dz1, allow_unused=True)
            dx2 = dy2 + grads[0]
            f_grads = list(grads[1:])
            x1 = (y1 - f_out.detach()).detach()
            # parameters were passed block by block as (F params, G params)
            param_grads = f_grads + g_grads + param_grads
            y1, y2, dy1, dy2 = x1, x2.detach(), dz1, dx2
        return (dy1, dy2, None, None, None, *param_grads)


def _maybe_replay(rng: RngState | None):
    return rng.replay() if rng is not None else contextlib.nullcontext()


def reversible_stack(x1: torch.Tensor, x2: torch.Tensor, blocks: Sequence[nn.Module], *, causal: bool,
                     replay_rng: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the coupling over `blocks`; gradients reach the parameters of every F and G.

    Each block provides `f(x, causal=)`, `g(x)`, `f_parameters()` and `g_parameters()`.
    """
    params: list[nn.Parameter] = []
    for block in blocks:
        params += block.f_parameters() + block.g_parameters()
    return _ReversibleStack.apply(x1, x2, list(blocks), causal, replay_rng, *params)
