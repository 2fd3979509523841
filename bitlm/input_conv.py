"""The input convolution (model.input_conv): each stack input plus a depthwise convolution of its neighbours'.

Why: attention has to learn from sinusoidal positions where the last few inputs are; a small
depthwise kernel hands every position a learned mix of them for d_model * (kernel + 1) parameters
(benchmarks/probe_causal_conv.py: -13.6% val bpb for the patched model, -7.6% for the byte model,
kernel 8, tiny preset). The residual form x + conv(x) keeps each position's own vector on an
identity path, as the patched body's non-causal neighbour_mix does, so the stack always sees the
input itself and the convolution only adds context.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class InputConv(nn.Module):
    """x + depthwise Conv1d over a window of `kernel` positions of x (B, T, d).

    Causal: position t reads t - kernel + 1 .. t; `history` (B, <= kernel - 1, d), the input vectors
    just before x, stands in for the zeros a whole-sequence forward pads with, which is how
    incremental decoding reproduces that forward. Non-causal: a centred window,
    t - (kernel - 1) // 2 .. t + kernel // 2, zero-padded at both ends.
    """

    def __init__(self, d_model: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(d_model, d_model, kernel, groups=d_model)

    def forward(self, x: torch.Tensor, *, causal: bool, history: Optional[torch.Tensor] = None) -> torch.Tensor:
        k, columns = self.kernel, x.transpose(1, 2)  # (B, d, T)
        if not causal:
            if history is not None:
                raise ValueError("the input convolution's history is for causal decoding")
            return x + self.conv(F.pad(columns, ((k - 1) // 2, k // 2))).transpose(1, 2)
        if history is not None and x.shape[1] == 1 and history.shape[1] == k - 1:
            # a decoding step: one output, a weighted sum of k vectors (~5x faster on CPU than Conv1d's
            # call for a width-k input, ~6% of a tuned model's batch-1 step)
            window = torch.cat([history.to(x.dtype), x], dim=1)  # (B, k, d)
            return x + (torch.einsum("bkd,dk->bd", window, self.conv.weight[:, 0]) + self.conv.bias)[:, None]
        if history is not None:
            columns = torch.cat([history.to(x.dtype).transpose(1, 2), columns], dim=2)
        padded = F.pad(columns, (k - 1 - (0 if history is None else history.shape[1]), 0))
        return x + self.conv(padded).transpose(1, 2)

    def history(self, x: torch.Tensor, before: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The last kernel - 1 vectors of `before` then x: the history of the inputs that follow x."""
        joined = x if before is None else torch.cat([before.to(x.dtype), x], dim=1)
        return joined[:, max(joined.shape[1] - (self.kernel - 1), 0):]
