"""Bit conditionals read from a joint over a byte's bit patterns (the patched model's model.byte_softmax).

A byte's n bits, MSB first, index its 2^n patterns. The byte softmax scores every pattern once and
reads bit j's logit, given the byte's earlier bits p, as log M(p1) - log M(p0), where M(q) is the
mass of the patterns that start with q; the n conditionals then multiply to the joint exactly.
Those prefixes are the nodes of a binary tree, laid out level by level from the root: node (j, p)
has index 2^j - 1 + p, and its two children's masses sit at 2n and 2n + 1 of `tree_masses`.

Training reads the n nodes on each byte's own path, and `joint_path_scores` does that with a
hand-written backward: the gradient of each score reaches only the patterns below its node, so it
flows down the tree level by level, a few small scatters and one pass over the patterns, instead
of autograd's record of every level's sums and their concatenation (the same values and
gradients, tested; benchmarks/bench_readout.py times the readout both ways).
"""

from __future__ import annotations

import torch

from .codec import bit_table

TINY = torch.finfo(torch.float32).tiny  # masses below it are clamped: a score is then about +-87, not inf
# model.known_parity: the parity bit's logit; p(wrong parity) = e^-30, below float32's step at 1, and a
# wrong parity bit in the input costs 30 nats (the bpb counts it) instead of an inf
PARITY_SCORE = 30.0


def bits_of_patterns(n: int) -> torch.Tensor:
    """(2^n, n) the bits of every pattern, MSB first (row v: pattern v)."""
    return (torch.arange(2 ** n)[:, None] >> (n - 1 - torch.arange(n))) & 1


def pattern_membership(n: int) -> torch.Tensor:
    """(2^n, 2 n) 0/1: row v marks the shared terms (m, bit m of v) of pattern v (model.tree_shared_bits
    with model.byte_softmax: each pattern's vector adds one shared vector per (bit, its value))."""
    membership = torch.zeros(2 ** n, 2 * n)
    membership.scatter_(1, 2 * torch.arange(n) + bits_of_patterns(n), 1.0)
    return membership


def tree_membership(bpb: int) -> torch.Tensor:
    """(2^bpb - 1 + bpb, 2 bpb^2) 0/1: row n marks the shared terms (j, m, bit m of p) of tree node n = (j, p)
    (model.tree_shared_bits without model.byte_softmax).

    The last bpb rows (the per-phase nodes of non-causal mode, which have no prefix) are zero.
    """
    membership = torch.zeros(2 ** bpb - 1 + bpb, 2 * bpb * bpb)
    for j in range(bpb):
        for p in range(2 ** j):
            for m in range(j):
                bit = (p >> (j - 1 - m)) & 1  # prefix bits MSB first
                membership[2 ** j - 1 + p, 2 * (j * bpb + m) + bit] = 1.0
    return membership


def known_parity_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """model.known_parity: (256,) the parity bit's logit given each data byte, +-PARITY_SCORE by the
    codec's even parity, and (256, 2) the log-probabilities of parity bit 0 and 1 (byte-at-once sampling)."""
    scores = PARITY_SCORE * (2.0 * bit_table(parity=True)[:, -1] - 1.0)
    return scores, torch.nn.functional.logsigmoid(torch.stack([-scores, scores], dim=-1))


def tree_masses(pattern_logits: torch.Tensor) -> torch.Tensor:
    """(..., 2^n) logits of a joint over bit patterns -> (..., 2^n - 1, 2) masses below each tree
    node's two children, in float32 and relative to the largest pattern's.

    The masses are sums of exp(logit - max) pairwise up the tree (pattern index MSB first); callers
    take the log of only the nodes they read: ~2x faster than a logsumexp per level over the tree.
    """
    logits = pattern_logits.float()
    levels = [(logits - logits.amax(-1, keepdim=True).detach()).exp()]  # the shift cancels in every score
    while levels[-1].shape[-1] > 2:
        levels.append(_pair_sums(levels[-1]))
    return torch.cat(levels[::-1], dim=-1).unflatten(-1, (-1, 2))


def log_ratio(children: torch.Tensor) -> torch.Tensor:
    """log(mass of child 1 / mass of child 0) of (..., 2) masses; a mass below float32's range is
    clamped, which bounds a score at about +-87 instead of making it inf."""
    logs = children.clamp_min(TINY).log()
    return logs[..., 1] - logs[..., 0]


def path_scores(children: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    """(..., k) scores of the given nodes from (..., n_tree, 2) child masses (tree_masses)."""
    return log_ratio(children.gather(-2, nodes[..., None].expand(*nodes.shape, 2)))


def joint_path_scores(pattern_logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(..., n) scores of bits 0..n-1 of each byte down its own path, from (..., 2^n) pattern logits
    and the byte's (...,) pattern index (its last bit is not read: no score depends on it).

    Equal to path_scores(tree_masses(logits), the path's nodes), gradients included.
    """
    return _JointPathScores.apply(pattern_logits, values)


def byte_path_scores(joint: torch.Tensor, prefix: torch.Tensor, parity_scores=None) -> torch.Tensor:
    """(..., bpb) scores of every bit of each byte down its own path: from (..., 2^bpb) pattern logits,
    or with model.known_parity's `parity_scores` (known_parity_tables) from (..., 2^8) data-pattern logits
    and then the parity bit's fixed score. `prefix` (...,) is the value of the byte's first bpb - 1 bits."""
    if parity_scores is None:
        return joint_path_scores(joint, prefix * 2)
    return torch.cat([joint_path_scores(joint, prefix), parity_scores[prefix][..., None]], dim=-1)


def _pair_sums(x: torch.Tensor) -> torch.Tensor:
    """(..., 2k) -> (..., k): entries 2i and 2i + 1 added (an add of two strided views is ~3x
    faster on CPU than a sum over a trailing dimension of 2)."""
    pairs = x.unflatten(-1, (-1, 2))
    return pairs[..., 0] + pairs[..., 1]


def _children(values: torch.Tensor, n: int, level: int) -> torch.Tensor:
    """(..., 2) indices, at tree level `level` (2^level entries), of the two children of each byte's
    path node at phase level - 1: its first level - 1 bits followed by 0 and by 1."""
    prefix = values >> (n - level)
    return torch.stack([prefix & ~1, prefix | 1], dim=-1)


class _JointPathScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pattern_logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        n = pattern_logits.shape[-1].bit_length() - 1
        logits = pattern_logits.float()
        weights = (logits - logits.amax(-1, keepdim=True)).exp()
        level, children = weights, []
        for depth in range(n, 0, -1):  # level `depth` holds the masses below phase depth - 1's nodes
            children.append(level.gather(-1, _children(values, n, depth)))
            if depth > 1:
                level = _pair_sums(level)
        masses = torch.stack(children[::-1], dim=-2)  # (..., n, 2): phase j's two children
        ctx.save_for_backward(weights, masses, values)
        ctx.logits_dtype = pattern_logits.dtype
        return log_ratio(masses).to(pattern_logits.dtype)

    @staticmethod
    def backward(ctx, grad_scores: torch.Tensor):
        weights, masses, values = ctx.saved_tensors
        n = masses.shape[-2]
        # d score_j / d M(child b) = (2b - 1) / M(child b); a clamped mass passes no gradient (as clamp_min)
        inverse = torch.where(masses >= TINY, masses.clamp_min(TINY).reciprocal(), 0.0)
        grad_scores = grad_scores.float()
        per_child = inverse * torch.stack([-grad_scores, grad_scores], dim=-1)  # (..., n, 2)
        # a mass is the sum of the masses below it: the gradient of a level is its parent's, repeated
        # for both children, plus what the scores put on it directly (two entries per byte)
        grad = per_child[..., 0, :]
        for depth in range(2, n):
            grad = grad[..., None].expand(*grad.shape, 2).flatten(-2)
            grad.scatter_add_(-1, _children(values, n, depth), per_child[..., depth - 1, :])
        # the last level is the patterns themselves: d M / d logit = the pattern's (relative) weight
        last = _children(values, n, n)
        grad = (weights.unflatten(-1, (-1, 2)) * grad[..., None]).flatten(-2) if n > 1 else weights * 0.0
        grad.scatter_add_(-1, last, weights.gather(-1, last) * per_child[..., n - 1, :])
        return grad.to(ctx.logits_dtype), None
