"""Model collapse: distil a teacher into a smaller student on selected windows, grow it on missed floors, save it.

The loss (Hinton et al.; T = 1 following "Distillation Scaling Laws", arXiv 2502.08606):
    data_weight * CE(student, data) + kl_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))
per predicted position: each bit's 2-way distribution for bit models (flat or patched, either way
round: both predict logits[:, t] for bit t + 1), each byte's 256-way one for the byte baseline.
After every round the student's val bpb and K/C/S (held-out text) and the C and S of its generated
samples are held against the floors; on a miss it is deepened once (one function-preserving layer),
then widened once (d_ff x width_scale, function-preserving), then the result says what is still missed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import telemetry as tm
from .codec import bytes_to_bits
from .config import MODEL_KINDS, ModelConfig, TrainConfig, to_dict
from .fields import check
from .data import ByteWindows, Corpus, corpus_identity
from .engine import evaluate, fit, resolve_device
from .evaluation import TELEMETRY_WINDOW_BYTES
from .model import BitTransformerLM
from .objective import LN2, LossOutput, model_inputs
from .parallel import cpu_state
from .sampling import generate
from .scaling import copy_weights_into, init_normal, expand_model
from .synthesizer import Selection, TelemetrySynthesizer, all_windows, check_model_and_windows, random_selection

METRICS_FILE = "metrics.json"
FORMAT = "bitlm-distill/1"
# floor name -> (measured key, direction): C and S are judged on generated samples (what the safety
# gate reads), K on the predictions for held-out text, bpb is a ceiling on held-out text
FLOOR_METRICS = {"k": ("val_K", "min"), "c": ("sample_C", "min"), "s": ("sample_S", "min"), "bpb": ("val_bpb", "max")}


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """How a student is distilled: selection, loss weights, rounds and what is measured after each."""

    selection: str = "cluster"  # cluster | random | all
    k: int = 8
    per_cluster: int = 4
    max_sequences: Optional[int] = None  # cluster at most this many windows (drawn with seed)
    temperature: float = 1.0
    kl_weight: float = 0.5
    data_weight: float = 0.5
    width_scale: float = 1.5
    max_rounds: int = 3  # initial, deepened, widened
    seed: int = 0
    n_samples: int = 4  # generated samples per measurement
    sample_bytes: int = 128
    sample_temperature: float = 0.8

    def __post_init__(self) -> None:
        check(self.selection in ("cluster", "random", "all"), "distill.selection",
               f"must be one of ['cluster', 'random', 'all'], got {self.selection!r}")
        check(self.k >= 1, "distill.k", f"must be >= 1, got {self.k}")
        check(self.per_cluster >= 1, "distill.per_cluster", f"must be >= 1, got {self.per_cluster}")
        check(self.temperature > 0, "distill.temperature", f"must be > 0, got {self.temperature}")
        check(self.kl_weight >= 0 and self.data_weight >= 0 and self.kl_weight + self.data_weight > 0,
               "distill.kl_weight/data_weight", "must be >= 0 and not both 0")
        check(self.width_scale > 1, "distill.width_scale", f"must be > 1, got {self.width_scale}")
        check(1 <= self.max_rounds <= 3, "distill.max_rounds", f"must be in [1, 3], got {self.max_rounds}")
        check(self.n_samples >= 1 and self.sample_bytes >= 16, "distill.n_samples/sample_bytes",
               "need at least one sample of at least 16 bytes")


def parse_floors(text: str) -> dict[str, float]:
    """'c=0.3,s=0.5' -> {'c': 0.3, 's': 0.5}; keys k, c, s (floors) and bpb (a ceiling)."""
    floors: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in FLOOR_METRICS:
            raise ValueError(f"floors: {item!r} is not NAME=VALUE with NAME one of {sorted(FLOOR_METRICS)}")
        try:
            floors[key] = float(value)
        except ValueError:
            raise ValueError(f"floors: {key}={value.strip()!r} is not a number") from None
        if not np.isfinite(floors[key]) or floors[key] < 0:
            raise ValueError(f"floors: {key} must be a finite number >= 0, got {value.strip()}")
    return floors


def student_config(student: str | ModelConfig, teacher_config: ModelConfig, context_bytes: int) -> ModelConfig:
    """A student ModelConfig: itself, or a preset of the teacher's kind and parity; checked against the teacher."""
    if isinstance(student, str):
        kind = next(name for name, fields in MODEL_KINDS.items()
                    if fields == {"arch": teacher_config.arch, "representation": teacher_config.representation})
        cfg = ModelConfig.from_name(student, kind=kind, parity=teacher_config.parity)
        max_bytes = cfg.max_input_ids // cfg.ids_per_byte
        if max_bytes < context_bytes:
            cfg = dataclasses.replace(cfg, max_positions=context_bytes * cfg.positions_per_byte)
    else:
        cfg = student
    check_pair(teacher_config, cfg)
    return cfg


def check_pair(teacher: ModelConfig, student: ModelConfig) -> None:
    """ValueError unless the student predicts the teacher's distributions (same bits per byte, both causal)."""
    if (teacher.representation == "byte") != (student.representation == "byte"):
        raise ValueError(f"student representation={student.representation!r} cannot learn the distributions of a "
                         f"{teacher.representation!r} teacher: distil bit to bit (flat or patched) or byte to byte")
    if student.parity != teacher.parity:
        raise ValueError(f"student model.parity={student.parity} ({student.bits_per_byte} bits per byte) does not "
                         f"match the teacher's parity={teacher.parity} ({teacher.bits_per_byte} bits per byte)")
    if not (teacher.causal and student.causal):
        raise ValueError("model.causal: teacher and student must both be causal (next-bit) models")


def distillation_loss(logits: torch.Tensor, ids: torch.Tensor, teacher_logits: torch.Tensor, *, ids_per_byte: int,
                      bit_model: bool, temperature: float = 1.0, kl_weight: float = 0.5,
                      data_weight: float = 0.5) -> LossOutput:
    """data_weight * CE + kl_weight * T^2 * KL(teacher || student) per predicted position, with bpb accounting.

    `logits` and `teacher_logits` are (B, T, V) over `ids` (B, T); entry t predicts id t + 1.
    """
    scored = logits[:, :-1].float()
    ce = F.cross_entropy(scored.reshape(-1, scored.shape[-1]), ids[:, 1:].reshape(-1),
                         reduction="none").view(ids.shape[0], -1)  # (B, T-1): entry t is the loss of id t+1
    target = F.log_softmax(teacher_logits[:, :-1].float().to(scored.device) / temperature, dim=-1)
    kl = F.kl_div(F.log_softmax(scored / temperature, dim=-1), target, log_target=True,
                  reduction="none").sum(-1)  # (B, T-1)
    first_scored = ids_per_byte - 1
    loss = data_weight * ce.mean() + kl_weight * temperature ** 2 * kl.mean()
    p_one = logits[:, first_scored:-1].float().softmax(-1)[..., 1] if bit_model else None
    n_bytes = ids.shape[0] * (ids.shape[1] // ids_per_byte - 1)
    return LossOutput(loss=loss, nll_bits=ce[:, first_scored:].detach().sum() / LN2, n_bytes=n_bytes, p_one=p_one)


def distillation_batch_loss(student, byte_windows: torch.Tensor, *, teacher, temperature: float = 1.0,
                            kl_weight: float = 0.5, data_weight: float = 0.5) -> LossOutput:
    """distillation_loss of `student` against `teacher` on (B, L) byte windows: both forwards, then the loss."""
    cfg = student.module.config if hasattr(student, "module") else student.config
    ids = model_inputs(teacher, byte_windows.to(next(teacher.parameters()).device))
    with torch.no_grad():
        teacher_logits = teacher(ids, causal=True)[0]
    ids = ids.to(next(student.parameters()).device)
    logits, _ = student(ids, causal=True)
    return distillation_loss(logits, ids, teacher_logits, ids_per_byte=cfg.ids_per_byte,
                             bit_model=cfg.representation == "bit", temperature=temperature, kl_weight=kl_weight,
                             data_weight=data_weight)


def widen(model: BitTransformerLM, width_scale: float, *, generator: Optional[torch.Generator] = None
          ) -> BitTransformerLM:
    """A copy of `model` with d_ff x width_scale and the same logits: new units read randomly, write zero."""
    old = model.config.d_ff
    new_cfg = dataclasses.replace(model.config, d_ff=max(old + 1, int(round(old * width_scale))))
    reference = next(model.parameters())
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        new = BitTransformerLM(new_cfg)
    with torch.no_grad():
        copy_weights_into(new, {k: v.cpu() for k, v in model.state_dict().items()})
        for block in new.body.stack.blocks:
            up, down = block.mlp[0], block.mlp[2]
            rows = old * up.out_features // new_cfg.d_ff  # swiglu: 2 rows per unit (gate, value)
            up.weight[rows:] = init_normal(up.weight[rows:].shape, generator)
            up.bias[rows:] = 0.0
            down.weight[:, old:] = 0.0
    return new.to(device=reference.device, dtype=reference.dtype).train(model.training)


@torch.no_grad()
def measure(model, corpus, *, context_bytes: int, batch_size: int = 16, eval_batches: int = 8,
            config: DistillConfig = DistillConfig()) -> dict[str, float]:
    """val_bpb, val_K/C/S (predictions on held-out text) and sample_C/S (C and S of generated samples)."""
    cfg = TrainConfig(batch_size=batch_size, context_bytes=context_bytes, n_eval_batches=eval_batches,
                      seed=config.seed, precision="fp32")
    scores = evaluate(model, corpus, cfg)
    val = (corpus.val if corpus.val.n_windows else corpus.train).to_numpy()
    reference = model.reference_marginals.cpu().numpy()
    bpb = model.config.bits_per_byte
    prompt_bytes = min(16, val.shape[1] - 1)
    rows = np.linspace(0, len(val) - 1, config.n_samples).round().astype(int)
    room = model.config.max_input_ids // model.config.ids_per_byte - prompt_bytes
    cs = []
    for i, row in enumerate(rows):
        sample = generate(model, bytes(val[row, :prompt_bytes]), min(config.sample_bytes, room),
                          temperature=config.sample_temperature, seed=config.seed + i).new_bytes
        cs.append(tm.complexity_and_symbiosis(bytes_to_bits(sample, parity=model.config.parity), reference, bpb,
                                              TELEMETRY_WINDOW_BYTES))
    return {"val_bpb": scores["val/bpb"], "val_K": scores["val/K"], "val_C": scores["val/C"],
            "val_S": scores["val/S"], "sample_C": float(np.mean([c for c, _ in cs])),
            "sample_S": float(np.mean([s for _, s in cs]))}


def check_floors(achieved: dict[str, float], floors: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Per floor: the measured metric, its value, the floor (a ceiling for bpb) and whether it is met."""
    checks = {}
    for name, bound in floors.items():
        key, direction = FLOOR_METRICS[name]
        value = achieved[key]
        checks[name] = {"metric": key, "achieved": value, "floor" if direction == "min" else "ceiling": bound,
                        "met": bool(value >= bound if direction == "min" else value <= bound)}
    return checks


@dataclass
class CollapseResult:
    """What collapse_submodel did: the student, whether the floors hold, each round, and the selection used."""

    student: BitTransformerLM
    met: bool
    missed: list[str]  # floor names still missed
    achieved: dict[str, float]
    floors: dict[str, float]
    rounds: list[dict[str, Any]]
    teacher_metrics: dict[str, float]
    selection: Selection
    teacher_parameters: int
    corpus: dict[str, str] = field(default_factory=dict)
    message: str = ""

    def metrics(self) -> dict[str, Any]:
        """The metrics.json document."""
        student = self.rounds[-1]
        return {"format": FORMAT, "met": self.met, "missed": self.missed, "message": self.message,
                "floors": self.floors, "achieved": self.achieved,
                "floor_checks": check_floors(self.achieved, self.floors),
                "teacher": {"val_bpb": self.teacher_metrics["val_bpb"], "metrics": self.teacher_metrics,
                            "n_parameters": self.teacher_parameters},
                "student": {"val_bpb": self.achieved["val_bpb"], "n_parameters": student["n_parameters"],
                            "config": student["config"]},
                "parameter_ratio": student["n_parameters"] / self.teacher_parameters,
                "n_rounds": len(self.rounds), "rounds": self.rounds, "selection": self.selection.to_dict(),
                "corpus": self.corpus}


TrainRound = Callable[[BitTransformerLM, Corpus, TrainConfig, int], BitTransformerLM]


def local_round(teacher, config: DistillConfig, device=None, report=None) -> TrainRound:
    """Train one round in this process through engine.fit with the distillation loss."""
    def train(student, corpus, train_cfg, round_index):
        def loss(net, batch):
            return distillation_batch_loss(net, batch, teacher=teacher, temperature=config.temperature,
                                     kl_weight=config.kl_weight, data_weight=config.data_weight)

        emit = None if report is None else (lambda metrics, path: report({**metrics, "distill/round": round_index}))
        result = fit(student, corpus, train_cfg, loss=loss, device=device, report=emit)
        return result.model
    return train


def select(teacher, corpus, config: DistillConfig, context_bytes: int) -> Selection:
    """The windows the student trains on, per config.selection (random draws as many as cluster would pick)."""
    if config.selection == "cluster":
        return TelemetrySynthesizer(teacher, seed=config.seed, context_bytes=context_bytes).cluster(
            corpus, config.k, config.per_cluster, max_sequences=config.max_sequences)
    if config.selection == "random":
        n = min(config.k * config.per_cluster, corpus.train.n_windows)
        return random_selection(corpus, n, seed=config.seed)
    return all_windows(corpus)


def restricted(corpus: Corpus, indices: list[int]) -> Corpus:
    """The corpus with its train split cut to `indices` (val and manifest, hence S's reference, unchanged)."""
    train = ByteWindows(np.ascontiguousarray(corpus.train.to_numpy()[np.asarray(indices)]))
    return Corpus(train, corpus.val, corpus.manifest, corpus.directory)


def collapse_submodel(teacher, corpus: Corpus, floors: dict[str, float], *, student: str | ModelConfig = "tiny",
                      width_scale: Optional[float] = None, config: Optional[DistillConfig] = None,
                      train: Optional[TrainConfig] = None, selection: Optional[Selection] = None,
                      device=None, report=None, train_round: Optional[TrainRound] = None) -> CollapseResult:
    """Distil `teacher` into a smaller `student` on selected windows until `floors` hold or three rounds are spent.

    Round 1 trains the student; a miss deepens it by one layer and trains again; a second miss widens
    d_ff by width_scale and trains again; a third returns with result.met False and result.missed
    naming the floors still missed (an honest miss is a result, not an exception). `train_round`
    replaces the in-process training (pipelines.distill runs each round on Ray Train).
    """
    config = config or DistillConfig()
    if width_scale is not None:  # the argument wins over config.width_scale (1.5 by default)
        config = dataclasses.replace(config, width_scale=width_scale)
    train = train or TrainConfig(max_steps=200, warmup_steps=20, eval_every_steps=100, n_eval_batches=4, log_every_steps=50)
    unknown = sorted(set(floors) - set(FLOOR_METRICS))
    if unknown:
        raise ValueError(f"floors: unknown {unknown}; known: {sorted(FLOOR_METRICS)}")
    device = resolve_device(device)
    teacher = teacher.to(device).eval()  # no dropout in the targets
    teacher_bytes = check_model_and_windows(teacher, corpus.train)
    context = min(train.context_bytes, teacher_bytes)
    cfg = student_config(student, teacher.config, context)
    context = min(context, cfg.max_input_ids // cfg.ids_per_byte)
    train = dataclasses.replace(train, context_bytes=context)
    selection = selection or select(teacher, corpus, config, context)
    subset = restricted(corpus, selection.indices)
    train_round = train_round or local_round(teacher, config, device, report)

    def measured(model):
        return measure(model, corpus, context_bytes=context, batch_size=train.batch_size,
                       eval_batches=train.n_eval_batches, config=config)

    teacher_metrics = measured(teacher)
    torch.manual_seed(train.seed)
    model = BitTransformerLM(cfg).to(device)
    model.set_reference_marginals(corpus.phase_marginals(cfg.parity))
    rounds: list[dict[str, Any]] = []
    changes = ["initial", "deepen", "widen"][:config.max_rounds]
    for index, change in enumerate(changes):
        if change == "deepen":
            before = model.config.n_layers
            model = expand_model(model, "depth", generator=torch.Generator().manual_seed(train.seed + index))
            what = f"n_layers {before} -> {model.config.n_layers}"
        elif change == "widen":
            before = model.config.d_ff
            model = widen(model, config.width_scale, generator=torch.Generator().manual_seed(train.seed + index))
            what = f"d_ff {before} -> {model.config.d_ff} (x{config.width_scale:g})"
        else:
            what = f"student {model.config.arch}/{model.config.representation} d_model {model.config.d_model}, " \
                   f"{model.config.n_layers} layers, d_ff {model.config.d_ff}"
        model = train_round(model, subset, train, index)
        achieved = measured(model)
        checks = check_floors(achieved, floors)
        missed = [name for name, check in checks.items() if not check["met"]]
        rounds.append({"round": index + 1, "change": change, "what": what, "config": to_dict(model.config),
                       "n_parameters": model.num_parameters(), "steps": train.max_steps, "achieved": achieved,
                       "missed": missed})
        if not missed:
            break
    message = (f"floors met after {len(rounds)} round(s)" if not missed else
               f"floors still missed after {len(rounds)} round(s) ({', '.join(changes[:len(rounds)])}): " +
               "; ".join(_miss_text(checks[name]) for name in missed))
    return CollapseResult(student=model, met=not missed, missed=missed, achieved=achieved, floors=dict(floors),
                          rounds=rounds, teacher_metrics=teacher_metrics, selection=selection,
                          teacher_parameters=teacher.num_parameters(), corpus=corpus_hashes(corpus),
                          message=message)


def _miss_text(check: dict[str, Any]) -> str:
    bound = "floor" if "floor" in check else "ceiling"
    return f"{check['metric']} {check['achieved']:.3f} vs {bound} {check[bound]:g}"


def corpus_hashes(corpus: Corpus) -> dict[str, str]:
    """sha256 of the manifest (its file's bytes, or canonical JSON for an in-memory corpus) and the corpus identity."""
    path = corpus.directory / "manifest.json" if corpus.directory is not None else None
    if path is not None and path.is_file():
        digest, of = hashlib.sha256(path.read_bytes()).hexdigest(), "manifest.json"
    else:
        digest = hashlib.sha256(json.dumps(corpus.manifest, sort_keys=True).encode()).hexdigest()
        of = "canonical JSON of the in-memory manifest"
    return {"manifest_sha256": digest, "manifest_sha256_of": of, "identity": corpus_identity(corpus.manifest)}


def save_model(model, path: str | Path) -> Path:
    """The save_pretrained layout, written atomically (a round's starting student for the Ray workers)."""
    return ckpt.save_pretrained(model, path)


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> BitTransformerLM:
    """A model from a save_pretrained directory, checked like every other source (bitlm.checkpoint)."""
    return ckpt.from_pretrained(path, device=device)


def save_distilled_model(student, path: str | Path, metrics: dict[str, Any]) -> Path:
    """The save_pretrained layout plus metrics.json, written atomically together; returns the directory."""
    path = Path(path)
    with ckpt.atomic_directory(path) as tmp:
        ckpt.write_model(tmp, student.config, cpu_state(student))
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True, default=float) + "\n")
    return path


def read_metrics(path: str | Path) -> dict[str, Any]:
    """The metrics.json of a distilled model directory."""
    return json.loads((Path(path) / METRICS_FILE).read_text())


__all__ = ["CollapseResult", "DistillConfig", "TelemetrySynthesizer", "collapse_submodel", "distillation_loss",
           "measure", "parse_floors", "save_distilled_model", "widen"]
