"""TelemetrySynthesizer: summarise each corpus sequence through a model and pick representatives by k-means.

A sequence is one window of a corpus split (its first `context_bytes` bytes). Its summary vector
is the mean over positions of the model's final-layer hidden state (after the final LayerNorm)
followed by K, C, S of what the model predicts for it and its bits per byte. Every column is
z-scored over the split, then the hidden block is scaled so that its total variance equals the
four telemetry columns' (each block weighs half in the distances, whatever d_model is).
Clustering is scikit-learn's MiniBatchKMeans (an optional extra: pip install 'bitlm[distill]'),
seeded; a cluster's representatives are its `per_cluster` members nearest to its centre.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import telemetry as tm
from .codec import bit_table
from .data import ByteWindows
from .modes import eval_mode
from .objective import LN2, model_inputs

SUMMARY_TELEMETRY = ("K", "C", "S", "bpb")  # the columns after the pooled hidden state


def require_sklearn():
    """sklearn.cluster.MiniBatchKMeans, or an ImportError that says how to install it."""
    try:
        from sklearn.cluster import MiniBatchKMeans
    except ImportError:
        raise ImportError("clustering needs scikit-learn: pip install 'bitlm[distill]'") from None
    return MiniBatchKMeans


@dataclass
class Selection:
    """Representative windows of one split and what their clusters look like."""

    indices: list[int]  # window indices into the split, grouped by cluster, nearest to the centre first
    method: str  # "cluster", "random" or "all"
    split: str = "train"
    k: int = 0
    per_cluster: int = 0
    seed: int = 0
    context_bytes: int = 0
    n_sequences: int = 0
    cluster_sizes: list[int] = field(default_factory=list)
    cluster_telemetry: list[dict[str, float]] = field(default_factory=list)  # mean K, C, S, bpb per cluster
    cluster_of: list[int] = field(default_factory=list)  # the cluster of each index

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "split": self.split, "k": self.k, "per_cluster": self.per_cluster,
                "seed": self.seed, "context_bytes": self.context_bytes, "n_sequences": self.n_sequences,
                "n_selected": len(self.indices), "indices": list(self.indices),
                "cluster_sizes": list(self.cluster_sizes), "cluster_telemetry": list(self.cluster_telemetry),
                "cluster_of": list(self.cluster_of)}


def check_model_and_windows(model, windows: ByteWindows, context_bytes: Optional[int] = None) -> int:
    """The context (bytes) a model reads from a split's windows; ValueError when model and data disagree."""
    cfg = model.config
    if not cfg.causal:
        raise ValueError("model.causal: a diffusion (non-causal) model cannot be summarised or distilled here; "
                         "use a causal model")
    if model.reference_marginals.numel() != cfg.bits_per_byte:
        raise ValueError(f"model reference marginals hold {model.reference_marginals.numel()} phases but the "
                         f"model reads {cfg.bits_per_byte} bits per byte (parity={cfg.parity})")
    model_bytes = cfg.max_input_ids // cfg.ids_per_byte
    if windows.window_bytes < 2:
        raise ValueError(f"corpus windows of {windows.window_bytes} bytes are too short")
    context = min(windows.window_bytes, model_bytes) if context_bytes is None else context_bytes
    if context < 2 or context > model_bytes or context > windows.window_bytes:
        raise ValueError(f"context_bytes={context}: must be in [2, {min(model_bytes, windows.window_bytes)}] "
                         f"(the model reads {model_bytes} bytes, corpus windows hold {windows.window_bytes})")
    return context


class TelemetrySynthesizer:
    """Summary vectors of a corpus' sequences through `model`, and k-means representatives of them."""

    def __init__(self, model, *, seed: int = 0, batch_size: int = 32, context_bytes: Optional[int] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.model = model
        self.seed = seed
        self.batch_size = batch_size
        self.context_bytes = context_bytes

    @torch.no_grad()
    def summaries(self, windows: ByteWindows, rows: Optional[np.ndarray] = None) -> np.ndarray:
        """(n, d_model + 4) float64: pooled final hidden state, then K, C, S and bpb of each window's start."""
        model = self.model
        context = check_model_and_windows(model, windows, self.context_bytes)
        data = windows.to_numpy()
        rows = np.arange(windows.n_windows) if rows is None else rows
        pooled: list[torch.Tensor] = []
        hook = model.body.norm.register_forward_hook(lambda m, inp, out: pooled.append(out.float().mean(dim=1)))
        out = []
        try:
            device = next(model.parameters()).device
            with eval_mode(model):
                for start in range(0, len(rows), self.batch_size):
                    batch = torch.from_numpy(np.ascontiguousarray(data[rows[start:start + self.batch_size], :context]))
                    ids = model_inputs(model, batch.to(device))
                    pooled.clear()
                    logits, _ = model(ids, causal=True)
                    tel = _row_telemetry(model, ids, logits)
                    out.append(torch.cat([pooled[-1].cpu().double(), tel.cpu().double()], dim=1))
        finally:
            hook.remove()
        return torch.cat(out).numpy()

    def cluster(self, corpus, k: int = 8, per_cluster: int = 1, *, split: str = "train",
                max_sequences: Optional[int] = None) -> Selection:
        """k clusters of a split's sequences; per_cluster representatives each (fewer in a smaller cluster)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: must be an integer >= 1, got {k!r}")
        if isinstance(per_cluster, bool) or not isinstance(per_cluster, int) or per_cluster < 1:
            raise ValueError(f"per_cluster: must be an integer >= 1, got {per_cluster!r}")
        windows = _split(corpus, split)
        context = check_model_and_windows(self.model, windows, self.context_bytes)
        rows = candidate_rows(windows.n_windows, max_sequences, self.seed)
        if k > len(rows):
            raise ValueError(f"k={k} exceeds the {len(rows)} sequences of the {split} split "
                             f"(windows of {windows.window_bytes} bytes); choose k <= {len(rows)}")
        MiniBatchKMeans = require_sklearn()
        raw = self.summaries(windows, rows)
        features = _weighted(raw)
        kmeans = MiniBatchKMeans(n_clusters=k, random_state=self.seed, n_init=3, batch_size=1024,
                                 max_iter=200).fit(features)
        labels = kmeans.labels_
        distances = np.linalg.norm(features - kmeans.cluster_centers_[labels], axis=1)
        indices, cluster_of, sizes, means = [], [], [], []
        for c in range(k):
            members = np.flatnonzero(labels == c)
            sizes.append(int(members.size))
            means.append({name: float(raw[members, -4 + j].mean()) if members.size else float("nan")
                          for j, name in enumerate(SUMMARY_TELEMETRY)})
            nearest = members[np.argsort(distances[members], kind="stable")][:per_cluster]
            indices += [int(rows[i]) for i in nearest]
            cluster_of += [c] * len(nearest)
        return Selection(indices=indices, method="cluster", split=split, k=k, per_cluster=per_cluster,
                         seed=self.seed, context_bytes=context, n_sequences=len(rows), cluster_sizes=sizes,
                         cluster_telemetry=means, cluster_of=cluster_of)


def random_selection(corpus, n: int, *, seed: int = 0, split: str = "train") -> Selection:
    """n distinct windows of a split drawn uniformly with `seed`: the control arm of cluster selection."""
    windows = _split(corpus, split)
    if n < 1 or n > windows.n_windows:
        raise ValueError(f"random selection of {n} windows: must be in [1, {windows.n_windows}]")
    picked = np.random.default_rng([seed, 11]).choice(windows.n_windows, size=n, replace=False)
    return Selection(indices=sorted(int(i) for i in picked), method="random", split=split, seed=seed,
                     n_sequences=windows.n_windows)


def all_windows(corpus, split: str = "train") -> Selection:
    """Every window of a split (no selection)."""
    windows = _split(corpus, split)
    return Selection(indices=list(range(windows.n_windows)), method="all", split=split,
                     n_sequences=windows.n_windows)


def candidate_rows(n_windows: int, max_sequences: Optional[int], seed: int) -> np.ndarray:
    """All window indices, or max_sequences of them drawn with `seed` (sorted), for large corpora."""
    if max_sequences is None or max_sequences >= n_windows:
        return np.arange(n_windows)
    if max_sequences < 1:
        raise ValueError(f"max_sequences: must be >= 1, got {max_sequences}")
    return np.sort(np.random.default_rng([seed, 13]).choice(n_windows, size=max_sequences, replace=False))


def _split(corpus, split: str) -> ByteWindows:
    if split not in ("train", "val"):
        raise ValueError(f"split: must be 'train' or 'val', got {split!r}")
    windows = getattr(corpus, split)
    if windows.n_windows == 0:
        raise ValueError(f"the {split} split has no windows to cluster")
    return windows


def _row_telemetry(model, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(B, 4): K, C, S of the model's predictions per row (as bitlm.evaluation reads them) and the row's bpb."""
    cfg = model.config
    bpb = cfg.bits_per_byte
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                          reduction="none").view(ids.shape[0], -1)
    first_scored = cfg.ids_per_byte - 1
    n_bytes = ids.shape[1] // cfg.ids_per_byte - 1
    row_bpb = nll[:, first_scored:].sum(dim=1) / LN2 / n_bytes
    if cfg.representation == "bit":
        scored = logits[:, bpb - 1:-1].float()
        p_one, predicted = scored.softmax(-1)[..., 1], scored.argmax(-1)
        summary = tm.prediction_summary(p_one, predicted, model.reference_marginals, bpb)
        k = summary["negentropy"]
    else:
        probs = logits[:, :-1].float().softmax(-1)
        table = bit_table(cfg.parity, probs.device).to(probs.dtype)
        p_one, predicted = (probs @ table).flatten(1), table[probs.argmax(-1)].flatten(1).long()
        summary = tm.prediction_summary(p_one, predicted, model.reference_marginals, bpb)
        k = tm.byte_negentropy(probs)
    return torch.stack([k.float().cpu(), summary["lz_complexity"].cpu(), summary["symbiosis"].cpu(),
                        row_bpb.float().cpu()], dim=1)


def _weighted(raw: np.ndarray) -> np.ndarray:
    """z-scored columns; the hidden block scaled to the total variance of the 4 telemetry columns."""
    std = raw.std(axis=0)
    z = (raw - raw.mean(axis=0)) / np.where(std > 0, std, 1.0)
    n_hidden = raw.shape[1] - len(SUMMARY_TELEMETRY)
    z[:, :n_hidden] *= np.sqrt(len(SUMMARY_TELEMETRY) / max(n_hidden, 1))
    return z
