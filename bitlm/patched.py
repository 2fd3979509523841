"""The byte-patched bit model: a global transformer at byte rate and a small local decoder per bit.

Bits in, per-bit logits out, in the flat model's layout, with exact bit-level causality:
  byte encoder   each byte's bits -> one vector (sum of per-(phase, value) embeddings + an MLP);
  global stack   the shared BlockStack over byte positions, shifted right behind a learned BOS
                 in causal mode, so the state of byte i has seen bytes < i only;
  local decoder  bit j of byte i as a node of the binary tree over the byte's values: the node is
                 fixed by (j, the value of bits < j), and its logit is <N[node], z_i> + b[node],
                 where z_i = A h_i (+ optional residual MLPs) is computed once per byte. Every
                 prefix has its own vector (a learned hierarchical softmax over the byte's bits),
                 and a bit costs one dot product, so the model's cost stays close to a byte model's.
                 model.byte_softmax (causal models) instead scores every pattern of the byte once,
                 <P[v], z_i> + c[v], and reads node (j, p) from that joint: the log-mass of the
                 patterns continuing p with 1 over those continuing it with 0 (bitlm.pattern_joint);
                 with model.known_parity only the 256 data patterns, the parity bit's logit fixed.
Non-causal (diffusion) mode: no shift (every byte sees every byte, masked bits enter the encoder
as MASK), and the byte vectors pass a depthwise convolution over their neighbours before the stack.
Why: in causal mode byte i's input already is byte i-1, so the residual stream carries a bigram
with no attention needed; a masked byte's input is the MASK vector, and every bit of context has
to be routed by attention from sinusoidal positions. Without the convolution the model sat at the
unigram entropy (4.8 bits per masked byte even at 5% masking) for the whole 10-minute budget;
with it, it learns from its neighbours from the first few hundred steps. Bit j of a masked byte
is read from z_i down the byte's tree given its earlier clean bits (`local_prefix`), or through a
per-phase vector when no prefix is given.

model.input_conv adds a depthwise convolution over the stack inputs (bitlm.input_conv): after the
BOS shift in causal mode, so position i still reads BOS and bytes < i only and bit-level causality
stays exact; over the byte vectors, centred, in non-causal mode.

forward is embed (byte encoder, BOS, input convolution) -> stack -> head (norm, to_local) ->
readout (the tree), each skipped when its module is None, so a pipeline stage is this body with
another stage's modules set to None; the last stage returns the per-byte features and its loss reads them out with
`readout`, which takes the bits the schedule already carries as the loss target.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .attention import DecodeState, KVCache, sinusoidal_table
from .blocks import BlockStack, StackOutput, make_norm
from .config import ModelConfig
from .input_conv import InputConv
from .pattern_joint import (bits_of_patterns, byte_path_scores, known_parity_tables, path_scores,
                            pattern_membership, tree_masses, tree_membership)


class _ResidualMLP(nn.Module):
    """x + MLP(norm(x)), the norm of model.norm."""

    def __init__(self, d: int, d_ff: int, norm: str):
        super().__init__()
        self.net = nn.Sequential(make_norm(norm, d), nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


_DENSE_PHASES = 8  # bit phases whose tree nodes the training readout scores with one matmul (255 nodes)
_ENCODE_DISTINCT_FROM = 64  # byte positions in a call from which encode_bytes encodes distinct patterns once
_NEIGHBOUR_KERNEL = 9  # bytes each side + 1 that the non-causal input convolution reads (best of 3, 5, 9)


def _node_scores(vectors: torch.Tensor, bias: torch.Tensor, ctx: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    """<N[node], z> + b[node] for (..., k) nodes of each byte and its (..., hidden) features z."""
    return (vectors[nodes] * ctx.unsqueeze(-2)).sum(-1) + bias[nodes]


class PatchedBody(nn.Module):
    n_inputs = 3  # 0, 1, MASK
    n_outputs = 2

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        bpb, d = cfg.bits_per_byte, cfg.d_model
        self.bits_per_byte = bpb
        # id of (phase j, value v) = 3 j + v: one table serves the encoder, another the local prefix
        self.byte_bits = nn.Embedding(3 * bpb, d)
        self.byte_mlp = _ResidualMLP(d, 2 * d, cfg.norm)
        # model.byte_table: one vector per whole pattern on top of the bit features, zero at the start
        # (a byte with a masked bit has no pattern and adds none)
        self.byte_table = nn.Parameter(torch.zeros(2 ** bpb, d)) if cfg.byte_table else None
        self.register_buffer("pattern_weights", 2 ** torch.arange(bpb - 1, -1, -1), persistent=False)
        self.bos = nn.Parameter(torch.zeros(d))
        # byte positions, BOS at 0; rotary codes the same positions inside attention, adding no table
        table = sinusoidal_table(cfg.max_positions + 1, d) if cfg.position_encoding == "sinusoidal" else None
        self.register_buffer("positions", table, persistent=False)
        self.stack = BlockStack(cfg)
        self.norm = make_norm(cfg.norm, d)
        hidden = cfg.local_d_ff or d
        # linear like the byte model's head: node scores are then bilinear in the global state;
        # local_d_ff=0 drops the projection (an empty Sequential without residual MLPs is the identity)
        projection = [nn.Linear(d, hidden)] if cfg.local_d_ff else []
        self.to_local = nn.Sequential(*projection,
                                      *(_ResidualMLP(hidden, 2 * hidden, cfg.norm) for _ in range(cfg.n_local_layers)))
        n_tree = 2 ** bpb - 1  # nodes (j, prefix value) for j < bpb; then one per phase for non-causal mode
        byte_softmax = cfg.byte_softmax and cfg.causal
        # bits the byte softmax scores: all of them, or with model.known_parity the data bits only
        self.joint_bits = bpb - 1 if byte_softmax and cfg.known_parity and cfg.parity else bpb
        if byte_softmax:
            # model.byte_softmax: one logit per whole pattern; the tree's node scores are read from that
            # joint (bitlm.pattern_joint), as the byte model's head scores its 256 bytes
            n_patterns = 2 ** self.joint_bits
            self.pattern_vectors, self.pattern_bias = nn.Embedding(n_patterns, hidden), nn.Embedding(n_patterns, 1)
            self.node_vectors = self.node_bias = None
        else:
            self.node_vectors = nn.Embedding(n_tree + bpb, hidden)
            self.node_bias = nn.Embedding(n_tree + bpb, 1)
            self.pattern_vectors = self.pattern_bias = None
        if self.joint_bits < bpb:  # the parity bit's logit given the data bits (the last phase's prefix)
            scores, log_probs = known_parity_tables()
            self.register_buffer("parity_scores", scores, persistent=False)
            self.register_buffer("parity_log_probs", log_probs, persistent=False)
        else:
            self.parity_scores = self.parity_log_probs = None
        self.register_buffer("tree_base", 2 ** torch.arange(bpb) - 1, persistent=False)
        if cfg.tree_shared_bits:
            # node (j, p) also reads sum_{m<j} S[j, m, bit m of p]: features shared by every byte whose
            # bit m has that value (upper- and lower-case letters share all but the case bit's); with
            # byte_softmax pattern v reads sum_m S[m, bit m of v]; zero at the start, so the plain model
            membership = (tree_membership(bpb) if self.pattern_vectors is None
                          else pattern_membership(self.joint_bits))
            self.shared_vectors = nn.Parameter(torch.zeros(membership.shape[1], hidden))
            self.shared_bias = nn.Parameter(torch.zeros(membership.shape[1]))
            self.register_buffer("shared_membership", membership, persistent=False)
        else:
            self.shared_vectors = self.shared_bias = None
        # prefix value of bit j = sum_{k<j} bit_k 2^(j-1-k): a (bpb-1, bpb) matrix, MSB first
        k, j = torch.arange(bpb - 1)[:, None], torch.arange(bpb)[None, :]
        self.register_buffer("prefix_weights", torch.where(k < j, 2.0 ** (j - 1 - k), 0.0), persistent=False)
        self.n_tree = n_tree
        self.register_buffer("phase_offsets", 3 * torch.arange(bpb), persistent=False)
        # a byte's bit ids (0, 1, MASK) as one base-3 number: its key for encoding distinct patterns once
        self.register_buffer("pattern_code", 3 ** torch.arange(bpb), persistent=False)
        # byte-at-once sampling: pattern v's bits (MSB first), and for each of its bpb path steps the
        # index into [logsigmoid(-s), logsigmoid(s)] (length 2 n_tree) that its bit takes there
        patterns = torch.arange(2 ** bpb)
        pattern_bits = bits_of_patterns(bpb)  # (2^bpb, bpb)
        path_nodes = (2 ** torch.arange(bpb) - 1) + (patterns[:, None] >> (bpb - torch.arange(bpb)))
        self.register_buffer("pattern_bits", pattern_bits, persistent=False)
        self.register_buffer("path_index", (path_nodes + n_tree * pattern_bits).flatten(), persistent=False)
        if not cfg.causal:  # depthwise: d x kernel weights, a few thousand parameters
            self.neighbour_mix = nn.Conv1d(d, d, _NEIGHBOUR_KERNEL, padding=_NEIGHBOUR_KERNEL // 2, groups=d)
        self.input_conv = InputConv(d, cfg.input_conv) if cfg.input_conv else None

    @property
    def cache_capacity(self) -> int:
        return self.cfg.max_positions + 1  # + the BOS position

    def encode_bytes(self, bits: torch.Tensor) -> torch.Tensor:
        """(B, L, bpb) bit ids -> (B, L, d) byte vectors.

        The encoder is a function of the byte's pattern alone, and a batch of text holds far fewer
        distinct patterns than positions (tinyshakespeare: ~50 in 16 x 64 bytes), so a large batch
        encodes each distinct pattern once and gathers: the same vectors, ~9x less encoder time in
        training (the gather's backward sums each pattern's gradient before the MLP's backward).
        """
        n_rows = bits.shape[0] * bits.shape[1]
        if n_rows < _ENCODE_DISTINCT_FROM:
            return self._encode_patterns(bits)
        flat = bits.reshape(n_rows, self.bits_per_byte)
        distinct, inverse = torch.unique((flat * self.pattern_code).sum(-1), return_inverse=True)
        # any row of each pattern represents it (they are equal); scatter keeps one of them
        first = torch.empty_like(distinct).scatter_(0, inverse, torch.arange(n_rows, device=bits.device))
        encoded = self._encode_patterns(flat[first][None])[0]
        return encoded[inverse].view(*bits.shape[:2], -1)

    def _encode_patterns(self, bits: torch.Tensor) -> torch.Tensor:
        encoded = self.byte_mlp(self.byte_bits(bits + self.phase_offsets).sum(dim=2))
        if self.byte_table is None:
            return encoded
        clean = (bits <= 1).all(-1, keepdim=True)  # MASK is id 2
        pattern = (bits.clamp(max=1) * self.pattern_weights).sum(-1)
        return encoded + self.byte_table[pattern] * clean.to(encoded.dtype)

    def encode_noncausal(self, bits: torch.Tensor) -> torch.Tensor:
        """(B, L, bpb) partly masked bit ids -> (B, L, d) byte vectors mixed with their neighbours'."""
        if not hasattr(self, "neighbour_mix"):
            raise ValueError("this patched model was built causal; build it with causal=False for diffusion")
        encoded = self.encode_bytes(bits)
        return encoded + self.neighbour_mix(encoded.transpose(1, 2)).transpose(1, 2)

    @property
    def readout_embeddings(self) -> tuple[nn.Embedding, nn.Embedding]:
        """The vectors and biases the readout scores: the tree's nodes, or with model.byte_softmax its patterns."""
        if self.pattern_vectors is None:
            return self.node_vectors, self.node_bias
        return self.pattern_vectors, self.pattern_bias

    def node_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every node's vector (n_nodes, hidden) and bias (n_nodes,), the shared per-bit terms added;
        with model.byte_softmax every pattern's (2^joint_bits, hidden) and (2^joint_bits,) instead."""
        vector_table, bias_table = self.readout_embeddings
        vectors, bias = vector_table.weight, bias_table.weight[:, 0]
        if self.shared_vectors is None:
            return vectors, bias
        membership = self.shared_membership.to(vectors.dtype)
        return vectors + membership @ self.shared_vectors, bias + membership @ self.shared_bias

    def _local_logits(self, ctx: torch.Tensor, bits: Optional[torch.Tensor], phases: torch.Tensor,
                      table: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """Bit logits (..., n_phases, 2) from per-byte features z (..., hidden) and the byte's bits.

        `bits` (..., n_prefix) are the byte's bits before the first predicted phase (causal mode),
        or None (non-causal mode: no prefix). `table` is node_table(), when the caller keeps it.
        """
        vectors, bias = self.node_table() if table is None else table
        if bits is None:  # one node per phase, the same for every byte: a (hidden, n_phases) matmul
            nodes = self.n_tree + phases
            score = torch.nn.functional.linear(ctx, vectors[nodes], bias[nodes])
            return torch.stack([torch.zeros_like(score), score], dim=-1)
        nodes = self._path_nodes(bits, phases)
        if self.pattern_vectors is not None:  # the byte's joint, then the masses below its path's nodes
            joint = torch.nn.functional.linear(ctx, vectors, bias)
            if phases.shape[0] == self.bits_per_byte:  # training, scoring: the last phase's prefix is the byte's path
                score = byte_path_scores(joint, nodes[..., -1] - self.tree_base[-1], self.parity_scores)
            else:
                score = self._joint_node_scores(tree_masses(joint), nodes, phases)
            score = score.to(ctx.dtype)
        elif phases.shape[0] == self.bits_per_byte:
            # every phase of every byte (training, scoring): one matmul scores all nodes of the first
            # phases and a gather picks each byte's path (~1.5x faster on CPU than a batched dot
            # product with gathered (..., bpb, hidden) node vectors, whose backward scatters that
            # many rows); the parity phase's 256 nodes, half the tree, are read one per byte
            dense = min(self.bits_per_byte, _DENSE_PHASES)
            n_dense = 2 ** dense - 1
            score = torch.nn.functional.linear(ctx, vectors[:n_dense], bias[:n_dense]).gather(-1, nodes[..., :dense])
            if dense < self.bits_per_byte:
                score = torch.cat([score, _node_scores(vectors, bias, ctx, nodes[..., dense:])], dim=-1)
        else:  # bit-by-bit decoding: one node per row
            score = _node_scores(vectors, bias, ctx, nodes)
        return torch.stack([torch.zeros_like(score), score], dim=-1)

    def _joint_node_scores(self, masses: torch.Tensor, nodes: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
        """(..., n_phases) scores of the given phases' nodes from the joint's tree masses (tree_masses);
        with model.known_parity the parity phase's node is not in the tree and reads its fixed score."""
        n_joint_nodes = masses.shape[-2]
        score = path_scores(masses, nodes.clamp(max=n_joint_nodes - 1))
        if self.parity_scores is None:
            return score
        prefix = nodes - self.tree_base[phases]
        return torch.where(phases == self.joint_bits, self.parity_scores[prefix].to(score.dtype), score)

    def _path_nodes(self, bits: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
        """(..., n_phases) tree node of each phase given the byte's (..., n_prefix) earlier bits."""
        values = bits.clamp(max=1).to(self.prefix_weights.dtype) @ self.prefix_weights[: bits.shape[-1], phases]
        return self.tree_base[phases] + values.round().long()

    def _global(self, byte_vectors: torch.Tensor, *, causal: bool, cache: Optional[KVCache],
                return_weights: bool) -> tuple[torch.Tensor, StackOutput]:
        """Run the stack over (B, N, d) inputs placed after the cache; returns local contexts (B, N, hidden)."""
        start = cache.length if cache is not None else 0
        n = byte_vectors.shape[1]
        out = self.stack(self._add_positions(byte_vectors, start), causal=causal, cache=cache,
                         return_weights=return_weights)
        if cache is not None:
            cache.advance(n)
        return self.to_local(self.norm(out.hidden.to(byte_vectors.dtype))), out

    def embed_bits(self, x: torch.Tensor, *, causal: bool, offset: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, T) bit ids, T a multiple of bits_per_byte -> (B, L (+1 BOS when causal), d) stack inputs."""
        B, T = x.shape
        bits = x.view(B, T // self.bits_per_byte, self.bits_per_byte)
        encoded = self.encode_bytes(bits) if causal else self.encode_noncausal(bits)  # (B, L, d)
        if offset is not None:  # (B, 1, d): the stream marker of each row
            encoded = encoded + offset
        if causal:  # byte i's state sees BOS and bytes < i; L + 1 states also predict the first bit after the input
            encoded = torch.cat([self.bos.expand(B, 1, -1).to(encoded.dtype), encoded], dim=1)
        if self.input_conv is not None:
            encoded = self.input_conv(encoded, causal=causal)
        return self._add_positions(encoded, 0)

    def _add_positions(self, h: torch.Tensor, start: int) -> torch.Tensor:
        """(B, N, d) stack inputs at byte positions start.. plus their sinusoidal codes (none with rotary)."""
        return h if self.positions is None else h + self.positions[start:start + h.shape[1]]

    def forward(self, x: torch.Tensor, *, causal: bool, cache: Optional[KVCache] = None,
                return_weights: bool = False, offset: Optional[torch.Tensor] = None,
                local_prefix: Optional[torch.Tensor] = None, readout: bool = True) -> tuple[torch.Tensor, StackOutput]:
        """Per-bit logits. Non-causal with `local_prefix` (B, T) clean bits: each bit is read from its
        tree node given the byte's earlier clean bits, so a masked byte's bits score -log p(byte).
        readout=False stops at the per-byte features (what a last pipeline stage hands its loss)."""
        if cache is not None:
            raise ValueError("patched models decode incrementally through start_decoding/decode_next")
        T, bpb = x.shape[1], self.bits_per_byte
        partial = self.byte_bits is not None and T % bpb
        if partial and not causal:
            raise ValueError(f"non-causal patched models read whole bytes: {T} bits is not a multiple of {bpb}")
        if self.byte_bits is not None:
            # an incomplete last byte is not a stack input (its bits read the state of the bytes before it):
            # the stack runs over BOS + the complete bytes (training's input, bitlm.objective.scored_inputs)
            h = self.embed_bits(x[:, :T - T % bpb], causal=causal, offset=offset)
        else:
            h = x  # a later pipeline stage: the hidden states of the stage before
        out = self.stack(h, causal=causal, return_weights=return_weights)
        if self.to_local is None:
            return out.hidden, out
        ctx = self.to_local(self.norm(out.hidden.to(h.dtype)))  # (B, L (+1), hidden)
        if not readout:
            return ctx, out
        if partial:  # the last byte padded to whole; causality is exact, so no logit before the padding changes
            padded = torch.nn.functional.pad(x, (0, bpb - T % bpb))
            return self.readout(ctx, padded, causal=True)[:, :T], out
        return self.readout(ctx, x, causal=causal, local_prefix=local_prefix), out

    def readout(self, ctx: torch.Tensor, ids: torch.Tensor, *, causal: bool = True,
                local_prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-bit logits (B, T, 2) from per-byte features and the (B, T) bits of whole bytes. Causal `ctx`:
        a state per byte and one after the last, or only one per byte (then no logit predicts past the
        last byte: (B, T - 1, 2))."""
        B, T = ids.shape
        bpb = self.bits_per_byte
        phases = torch.arange(bpb, device=ids.device)
        if not causal:
            prefix = None if local_prefix is None else local_prefix.view(B, T // bpb, bpb)[..., :-1]
            return self._local_logits(ctx, prefix, phases).reshape(B, T, 2)
        bits = ids.view(B, T // bpb, bpb)
        if ctx.shape[1] > bits.shape[1]:
            bits = torch.cat([bits, torch.zeros_like(bits[:, :1])], dim=1)  # byte L's bits are unknown (unused)
        per_bit = self._local_logits(ctx, bits[..., :-1], phases).reshape(B, -1, 2)
        # per_bit[:, k] predicts bit k; the shared layout wants logits[:, t] to predict bit t + 1
        return per_bit[:, 1:T + 1]

    def start_decoding(self, ids: torch.Tensor, cache: KVCache) -> tuple[DecodeState, torch.Tensor]:
        B, T = ids.shape
        n_full = T // self.bits_per_byte
        encoded = self.encode_bytes(ids[:, :n_full * self.bits_per_byte].view(B, n_full, self.bits_per_byte))
        shifted = torch.cat([self.bos.expand(B, 1, -1).to(encoded.dtype), encoded], dim=1)
        state = DecodeState(cache=cache, extra={"prefix": ids[:, n_full * self.bits_per_byte:]})
        self._global_step(state, shifted)
        return state, self._next_bit_logits(state)

    def decode_next(self, state: DecodeState, next_ids: torch.Tensor) -> torch.Tensor:
        prefix = torch.cat([state.extra["prefix"], next_ids[:, None]], dim=1)
        if prefix.shape[1] == self.bits_per_byte:
            self.push_byte(state, prefix)
        else:
            state.extra = {**state.extra, "prefix": prefix}
        return self._next_bit_logits(state)

    def push_byte(self, state: DecodeState, bits: torch.Tensor, encoded: Optional[torch.Tensor] = None) -> None:
        """Append one whole byte per row, (B, bpb) bits, to the decoding state: one global step.

        The only per-byte step of causal decoding: bit-by-bit decoding calls it when a byte's
        last bit arrives, byte-at-once decoding after every sampled byte. `encoded` (B, 1, d) is
        encode_bytes(bits[:, None]) when the caller has it (byte-at-once looks it up in a table).
        """
        if encoded is None:
            encoded = self.encode_bytes(bits[:, None])
        state.extra = {**state.extra, "prefix": bits[:, :0]}
        self._global_step(state, encoded)

    def next_byte_log_probs(self, state: DecodeState) -> torch.Tensor:
        """(B, 2^bpb) float32 log-probabilities of the next byte's bit patterns (index = bits MSB first).

        Exact: the scores of all tree nodes in one matmul, and log p(pattern) = the sum of
        logsigmoid(+-score) down its path, which is the product of the bit-by-bit conditionals.
        With parity the 2^9 patterns include wrong-parity ones, at whatever mass the model gives them
        (with model.known_parity, e^-30 of their data pattern's).
        """
        if state.extra["prefix"].shape[1]:
            raise ValueError("byte-at-once decoding needs a state on a byte boundary "
                             f"({state.extra['prefix'].shape[1]} bits of the next byte are already given)")
        n = self.n_tree
        vectors, bias = self._decoding_table(state)
        if self.pattern_vectors is not None:  # the joint itself
            log_probs = torch.addmm(bias.float(), state.extra["ctx"].float(), vectors.float().T).log_softmax(-1)
            if self.parity_log_probs is None:
                return log_probs
            # model.known_parity: data pattern d's mass split between parity bits 0 and 1 (index 2 d + bit)
            return (log_probs[..., None] + self.parity_log_probs).flatten(-2)
        scores = torch.addmm(bias[:n].float(), state.extra["ctx"].float(), vectors[:n].float().T)  # (B, n_tree)
        log_one = torch.nn.functional.logsigmoid(scores)
        branch = torch.cat([log_one - scores, log_one], dim=-1)  # logsigmoid(-s) = logsigmoid(s) - s
        # a gather, not a (2 n_tree, 2^bpb) matmul: each path has only bpb nodes (~7x faster at bpb = 9)
        return branch[:, self.path_index].view(-1, 2 ** self.bits_per_byte, self.bits_per_byte).sum(-1)

    def byte_encodings(self) -> torch.Tensor:
        """(2^bpb, 1, d) encode_bytes of every bit pattern: a table for push_byte while the weights stay fixed."""
        return self.encode_bytes(self.pattern_bits[:, None])

    def _global_step(self, state: DecodeState, inputs: torch.Tensor) -> None:
        """Advance the global stack by (B, N, d) byte-rate inputs (BOS, encoded bytes) after the cache.

        Sets state.extra["ctx"], the local features of the last new position; with model.input_conv
        the convolution reads the inputs kept in state.extra["inputs"], which this step updates.
        """
        if self.input_conv is not None:
            history = state.extra.get("inputs")
            state.extra = {**state.extra, "inputs": self.input_conv.history(inputs, history)}
            inputs = self.input_conv(inputs, causal=True, history=history)
        ctx, _ = self._global(inputs, causal=True, cache=state.cache, return_weights=False)
        # a new byte's features: the joint's masses of the last one (byte_softmax) no longer hold
        state.extra = {**{k: v for k, v in state.extra.items() if k != "masses"}, "ctx": ctx[:, -1]}

    def _next_bit_logits(self, state: DecodeState) -> torch.Tensor:
        prefix = state.extra["prefix"]
        phase = torch.tensor([prefix.shape[1]], device=prefix.device)
        if self.pattern_vectors is None:
            return self._local_logits(state.extra["ctx"], prefix, phase, self._decoding_table(state))[:, 0]
        # byte_softmax: the joint and its tree masses once per byte, read by each of its bits
        if "masses" not in state.extra:
            vectors, bias = self._decoding_table(state)
            masses = tree_masses(torch.nn.functional.linear(state.extra["ctx"], vectors, bias))
            state.extra = {**state.extra, "masses": masses}
        score = self._joint_node_scores(state.extra["masses"], self._path_nodes(prefix, phase), phase)
        score = score.to(state.extra["ctx"].dtype)
        return torch.stack([torch.zeros_like(score), score], dim=-1)[:, 0]

    def _decoding_table(self, state: DecodeState) -> tuple[torch.Tensor, torch.Tensor]:
        """node_table(), computed once per decoding state (the weights stay fixed while decoding)."""
        if "node_table" not in state.extra:
            state.extra = {**state.extra, "node_table": self.node_table()}
        return state.extra["node_table"]

    def sample_bytes(self, x: torch.Tensor, *, temperature: float, generator: torch.Generator) -> torch.Tensor:
        """Draw every byte of (B, T) masked bits from the non-causal model, bit by bit down its tree.

        Returns (B, T) sampled bits; the diffusion sampler keeps those of the bytes it reveals.
        """
        B, T = x.shape
        bpb = self.bits_per_byte
        encoded = self.encode_noncausal(x.view(B, T // bpb, bpb))
        if self.input_conv is not None:
            encoded = self.input_conv(encoded, causal=False)
        ctx, _ = self._global(encoded, causal=False, cache=None, return_weights=False)
        bits = x.new_zeros(B, T // bpb, 0)
        for j in range(bpb):
            logits = self._local_logits(ctx, bits, torch.tensor([j], device=x.device))[..., 0, :]  # (B, L, 2)
            p_one = (logits.float() / temperature).softmax(-1)[..., 1].cpu()
            draw = (torch.rand(p_one.shape, generator=generator) < p_one).long().to(x.device)
            bits = torch.cat([bits, draw[..., None]], dim=-1)
        return bits.view(B, T)
