"""Distillation: TelemetrySynthesizer clustering, collapse_submodel rounds, the distillation loss, metrics.json."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from bitlm import checkpoint as ckpt
from bitlm.config import ModelConfig, TrainConfig
from bitlm.data import Corpus
from bitlm.distill import (DistillConfig, check_pair, collapse_submodel, distillation_batch_loss, distillation_loss,
                           parse_floors, read_metrics, save_distilled_model, student_config, widen)
from bitlm.engine import fit
from bitlm.model import BitTransformerLM
from bitlm.objective import model_inputs
from bitlm.scaling import expand_model
from bitlm.synthesizer import TelemetrySynthesizer

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared/data/tinyshakespeare.txt"
TEXT = (b"the quick brown fox jumps over the lazy dog. " * 60 + b"pack my box with five dozen liquor jugs! " * 60)
TEACHER = ModelConfig.from_name("tiny", kind="patched", max_positions=64)
STUDENT = dataclasses.replace(TEACHER, d_model=32, d_ff=128)  # about half the teacher's parameters
TRAIN = TrainConfig(batch_size=8, context_bytes=32, max_steps=300, warmup_steps=20, eval_every=300, eval_batches=4,
                    log_every=100, precision="fp32", lr=3e-3)
SHORT = dataclasses.replace(TRAIN, max_steps=30, warmup_steps=5, eval_every=30)
# Margin of the student's val bpb over the teacher's: the student has 53% of the teacher's parameters
# and the same 300 steps; measured gap 0.03 bpb. 0.3 bpb (7% of the teacher's 4.3) leaves room for float
# differences across thread counts yet is far below the gap to an untrained student (about 9 bpb).
BPB_MARGIN = 0.3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The 2 CPUs are shared with other tests: one thread is about 8x faster here than two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    text = SHAKESPEARE.read_bytes()[:60_000] if SHAKESPEARE.is_file() else TEXT * 5
    return Corpus.from_bytes(text, window_bytes=128)


@pytest.fixture(scope="module")
def teacher(corpus):
    torch.manual_seed(0)
    model = BitTransformerLM(TEACHER)
    fit(model, corpus, TRAIN)
    return model.eval()


@pytest.fixture(scope="module")
def distilled(teacher, corpus):
    return collapse_submodel(teacher, corpus, {"c": 0.3, "s": 0.5}, student=STUDENT, train=TRAIN,
                             config=DistillConfig(k=8, per_cluster=4))


@pytest.fixture(scope="module")
def exhausted(teacher, corpus):
    """Floors nothing meets: S of 0.999 and bpb under 1 after 30 steps."""
    return collapse_submodel(teacher, corpus, {"s": 0.999, "bpb": 1.0}, student=STUDENT, train=SHORT,
                             config=DistillConfig(k=4, per_cluster=2, n_samples=2, sample_bytes=32))


def test_cluster_returns_k_distinct_representatives_identical_for_a_seed(teacher, corpus):
    first = TelemetrySynthesizer(teacher, seed=3).cluster(corpus, k=8)
    again = TelemetrySynthesizer(teacher, seed=3).cluster(corpus, k=8)
    assert len(first.indices) == 8 and len(set(first.indices)) == 8
    assert sorted(set(first.cluster_of)) == list(range(8))
    assert first.indices == again.indices and first.cluster_sizes == again.cluster_sizes
    assert sum(first.cluster_sizes) == corpus.train.n_windows
    assert set(first.cluster_telemetry[0]) == {"K", "C", "S", "bpb"}


def test_summary_vectors_hold_the_pooled_hidden_state_and_telemetry(teacher, corpus):
    vectors = TelemetrySynthesizer(teacher).summaries(corpus.train)
    assert vectors.shape == (corpus.train.n_windows, TEACHER.d_model + 4)
    k, c, s, bpb = vectors[:, -4:].T
    assert ((0 <= k) & (k <= 1) & (0 <= c) & (c <= 1) & (0 <= s) & (s <= 1)).all() and (bpb > 0).all()


def test_cluster_refuses_bad_k_and_a_model_the_corpus_does_not_fit(teacher, corpus):
    with pytest.raises(ValueError, match="^k: must be an integer >= 1, got 0$"):
        TelemetrySynthesizer(teacher).cluster(corpus, k=0)
    with pytest.raises(ValueError, match=f"k=100000 exceeds the {corpus.train.n_windows} sequences"):
        TelemetrySynthesizer(teacher).cluster(corpus, k=100_000)
    with pytest.raises(ValueError, match="context_bytes=256"):
        TelemetrySynthesizer(teacher, context_bytes=256).cluster(corpus, k=2)
    with pytest.raises(ValueError, match="model.causal"):
        TelemetrySynthesizer(BitTransformerLM(dataclasses.replace(TEACHER, causal=False))).cluster(corpus, k=2)


def test_missing_scikit_learn_names_the_extra(teacher, corpus, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    with pytest.raises(ImportError, match=r"pip install 'bitlm\[distill\]'"):
        TelemetrySynthesizer(teacher).cluster(corpus, k=2)


def test_distilled_student_is_smaller_and_within_the_margin_of_the_teacher(teacher, distilled):
    if not SHAKESPEARE.is_file():
        # the margin is measured on tinyshakespeare; the two repeated pangrams of the stand-in are
        # memorised by the teacher (1.85 bpb) far faster than by the half-size student (2.70)
        pytest.skip(f"tinyshakespeare not found at {SHAKESPEARE} (the shared/ folder beside the repo root)")
    assert distilled.met and distilled.missed == [] and len(distilled.rounds) == 1
    assert distilled.student.num_parameters() < teacher.num_parameters()
    assert distilled.achieved["val_bpb"] <= distilled.teacher_metrics["val_bpb"] + BPB_MARGIN
    assert distilled.selection.method == "cluster" and len(set(distilled.selection.indices)) == 32


def test_metrics_json_has_every_field_and_matches_the_measurement(teacher, corpus, distilled, tmp_path):
    path = save_distilled_model(distilled.student, tmp_path / "student", distilled.metrics())
    metrics = read_metrics(path)
    assert ckpt.validate_pretrained(path) == distilled.student.config  # the save_pretrained layout
    assert metrics["achieved"] == pytest.approx(distilled.achieved)
    assert metrics["floors"] == {"c": 0.3, "s": 0.5}
    assert metrics["floor_checks"]["s"] == {"metric": "sample_S", "floor": 0.5, "met": True,
                                            "achieved": pytest.approx(distilled.achieved["sample_S"])}
    assert metrics["teacher"]["val_bpb"] == pytest.approx(distilled.teacher_metrics["val_bpb"])
    assert metrics["student"]["val_bpb"] == pytest.approx(distilled.achieved["val_bpb"])
    assert metrics["teacher"]["n_parameters"] == teacher.num_parameters()
    assert metrics["student"]["n_parameters"] == distilled.student.num_parameters()
    assert metrics["n_rounds"] == 1 and metrics["rounds"][0]["change"] == "initial"
    assert metrics["selection"]["indices"] == distilled.selection.indices
    assert metrics["corpus"]["manifest_sha256"] == distilled.corpus["manifest_sha256"]
    assert len(metrics["corpus"]["manifest_sha256"]) == 64
    # the saved student is the measured one
    loaded = ckpt.from_pretrained(path)
    ids = model_inputs(loaded, torch.from_numpy(corpus.val.to_numpy()[:2, :32].copy()))
    assert torch.equal(loaded(ids)[0], distilled.student.cpu().eval()(ids)[0])


def test_floors_nothing_meets_deepen_then_widen_then_stop_with_the_misses(exhausted):
    assert not exhausted.met and exhausted.missed == ["s", "bpb"]
    assert [r["change"] for r in exhausted.rounds] == ["initial", "deepen", "widen"]
    configs = [r["config"] for r in exhausted.rounds]
    assert [c["n_layers"] for c in configs] == [STUDENT.n_layers, STUDENT.n_layers + 1, STUDENT.n_layers + 1]
    assert [c["d_ff"] for c in configs] == [STUDENT.d_ff, STUDENT.d_ff, int(STUDENT.d_ff * 1.5)]
    assert "floors still missed after 3 round(s)" in exhausted.message and "sample_S" in exhausted.message
    assert exhausted.metrics()["missed"] == ["s", "bpb"]


def test_a_floor_the_first_student_misses_is_met_after_deepening(teacher, corpus, exhausted):
    first, second = (r["achieved"]["val_bpb"] for r in exhausted.rounds[:2])
    assert second < first  # the deepened student, trained further, scores better
    result = collapse_submodel(teacher, corpus, {"bpb": (first + second) / 2}, student=STUDENT, train=SHORT,
                               config=DistillConfig(k=4, per_cluster=2, n_samples=2, sample_bytes=32))
    assert result.met and [r["change"] for r in result.rounds] == ["initial", "deepen"]
    assert result.rounds[0]["missed"] == ["bpb"]


def test_widen_and_deepen_keep_the_logits(teacher):
    ids = torch.randint(0, 2, (2, 32 * 9))
    base = BitTransformerLM(STUDENT).eval()
    for grown in (widen(base, 1.5), expand_model(base, "depth")):
        assert torch.allclose(grown.eval()(ids)[0], base(ids)[0], atol=1e-5)
    assert widen(base, 1.5).config.d_ff == 192


@pytest.mark.parametrize("student_kind", ["patched", "flat"])
def test_the_loss_is_the_data_loss_alone_when_the_student_is_the_teacher(teacher, corpus, student_kind):
    batch = torch.from_numpy(corpus.train.to_numpy()[:2, :16].copy())
    out = distillation_batch_loss(teacher, batch, teacher=teacher, kl_weight=1.0, data_weight=0.0)
    assert float(out.loss.detach()) == pytest.approx(0.0, abs=1e-6)
    flat = BitTransformerLM(ModelConfig.from_name("tiny", kind=student_kind, max_positions=16 * 9))
    mixed = distillation_batch_loss(flat, batch, teacher=teacher, temperature=2.0)
    assert mixed.loss.requires_grad and float(mixed.loss.detach()) > 0 and mixed.n_bytes == 2 * 15


def test_the_loss_on_logits_is_the_weighted_sum_of_cross_entropy_and_tempered_kl():
    torch.manual_seed(0)
    ids = torch.randint(0, 2, (2, 18))  # two bytes of 9 bits per row
    logits, teacher_logits = torch.randn(2, 18, 2), torch.randn(2, 18, 2)
    out = distillation_loss(logits, ids, teacher_logits, ids_per_byte=9, bit_model=True, temperature=2.0,
                            kl_weight=0.3, data_weight=0.7)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 2), ids[:, 1:].reshape(-1))
    p, q = (teacher_logits[:, :-1] / 2).softmax(-1), (logits[:, :-1] / 2).softmax(-1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    assert float(out.loss) == pytest.approx(float(0.7 * ce + 0.3 * 4 * kl), rel=1e-5)
    assert out.n_bytes == 2 * 1 and out.p_one.shape == (2, 9)  # the first byte's bits have no context


def test_byte_to_byte_distillation_loss_is_finite(corpus):
    byte = ModelConfig.from_name("tiny", kind="byte", max_positions=32)
    batch = torch.from_numpy(corpus.train.to_numpy()[:2, :16].copy())
    out = distillation_batch_loss(BitTransformerLM(byte), batch, teacher=BitTransformerLM(byte))
    assert torch.isfinite(out.loss) and out.p_one is None


def test_teacher_and_student_must_agree_on_parity_and_representation():
    with pytest.raises(ValueError, match=r"student model.parity=False \(8 bits per byte\) does not match"):
        check_pair(TEACHER, dataclasses.replace(STUDENT, parity=False))
    with pytest.raises(ValueError, match="distil bit to bit"):
        check_pair(TEACHER, ModelConfig.from_name("tiny", kind="byte"))
    with pytest.raises(ValueError, match=r"model preset: unknown 'huge'"):
        student_config("huge", TEACHER, 32)
    assert student_config("tiny", TEACHER, 32).arch == "patched"


def test_parse_floors_names_a_bad_item():
    assert parse_floors("c=0.3, s=0.5,bpb=2") == {"c": 0.3, "s": 0.5, "bpb": 2.0}
    with pytest.raises(ValueError, match="'x=1' is not NAME=VALUE"):
        parse_floors("x=1")
    with pytest.raises(ValueError, match="c='high' is not a number"):
        parse_floors("c=high")


def test_fit_refuses_a_custom_loss_for_a_diffusion_model(corpus):
    model = BitTransformerLM(dataclasses.replace(TEACHER, causal=False))
    with pytest.raises(ValueError, match="custom objective needs a causal model"):
        fit(model, corpus, SHORT, loss=lambda net, batch: None)


# ---------------------------------------------------------------------------------------------- bitlm distill --local


@pytest.fixture(scope="module")
def cli_dirs(teacher, tmp_path_factory):
    """(root, corpus dir, teacher dir, a student JSON) under one root, which is the allowed root of the CLI."""
    from bitlm.data import prepare_corpus

    root = tmp_path_factory.mktemp("cli")
    source = root / "source.txt"
    source.write_bytes(SHAKESPEARE.read_bytes()[:60_000] if SHAKESPEARE.is_file() else TEXT * 5)
    prepare_corpus([source], root / "data", window_bytes=128, progress=False)
    ckpt.save_pretrained(teacher, root / "teacher")
    (root / "student.json").write_text(json.dumps(ckpt.read_config(root / "teacher").__dict__
                                                  | {"d_model": 32, "d_ff": 128}))
    return root


def distill_cli(root, *args):
    from click.testing import CliRunner

    from bitlm.cli import main

    return CliRunner().invoke(main, ["distill", str(root / "teacher"), "--data", str(root / "data"), "--local",
                                     "--allowed-root", str(root), *args], catch_exceptions=False)


def test_cli_local_writes_the_student_and_its_metrics(cli_dirs):
    out = cli_dirs / "out"
    result = distill_cli(cli_dirs, "--student", str(cli_dirs / "student.json"), "--out", str(out), "--steps", "10",
                         "--k", "2", "--per-cluster", "2", "--floors", "s=0.999")
    assert result.exit_code == 0, result.output
    metrics = read_metrics(out)
    assert metrics["n_rounds"] == 3 and metrics["missed"] == ["s"] and metrics["teacher"]["source"].endswith("teacher")
    assert "floors still missed after 3 round(s)" in result.output and f"saved to {out}" in result.output
    assert ckpt.validate_pretrained(out).d_ff == 192  # its header length has low byte 0x80


@pytest.mark.parametrize("args, names", [
    (("--k", "0"), "'--k': 0 is not in the range x>=1"),
    (("--student", "huge"), "--student: model preset: unknown 'huge'"),
    (("--floors", "c=high"), "--floors: floors: c='high' is not a number"),
])
def test_cli_bad_options_are_one_line_errors(cli_dirs, args, names):
    result = distill_cli(cli_dirs, *args)
    assert result.exit_code == 2
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and names in error[0]


def test_cli_teacher_outside_the_allowed_roots_is_one_line(cli_dirs, tmp_path):
    from click.testing import CliRunner

    from bitlm.cli import main

    result = CliRunner().invoke(main, ["distill", str(cli_dirs / "teacher"), "--data", str(cli_dirs / "data"),
                                       "--local", "--allowed-root", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("Error: Invalid value for TEACHER: model source")
    assert "outside the allowed roots" in result.output


def test_cli_parity_of_the_student_must_be_the_teachers(cli_dirs):
    config = json.loads((cli_dirs / "student.json").read_text()) | {"parity": False}
    (cli_dirs / "no-parity.json").write_text(json.dumps(config))
    result = distill_cli(cli_dirs, "--student", str(cli_dirs / "no-parity.json"))
    assert result.exit_code == 2
    assert "Error: Invalid value for --student: student model.parity=False (8 bits per byte) does not match the " \
           "teacher's parity=True (9 bits per byte)" in result.output


def test_cli_refuses_an_out_holding_other_files(cli_dirs):
    (cli_dirs / "busy").mkdir()
    (cli_dirs / "busy" / "notes.txt").write_text("mine")
    result = distill_cli(cli_dirs, "--out", str(cli_dirs / "busy"))
    assert result.exit_code == 2 and "holds files that are not a distilled model" in result.output
    assert (cli_dirs / "busy" / "notes.txt").read_text() == "mine"


def test_train_auto_collapse_distils_the_trained_model(cli_dirs):
    from click.testing import CliRunner

    from bitlm.cli import main

    out = cli_dirs / "run"
    result = CliRunner().invoke(main, [
        "train", "--local", "--data", str(cli_dirs / "data"), "--out", str(out), "--preset", "tiny", "--steps", "10",
        "--set", "train.context_bytes=32", "--set", "train.batch_size=4", "--auto-collapse", "--collapse-student",
        str(cli_dirs / "student.json"), "--collapse-floors", "bpb=100", "--collapse-steps", "5"],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = read_metrics(out / "distilled")
    assert metrics["met"] and metrics["teacher"]["source"] == str(out / "model")
    assert metrics["teacher"]["n_parameters"] == ckpt.from_pretrained(out / "model").num_parameters()


def test_train_auto_collapse_checks_its_floors_before_training(cli_dirs):
    from click.testing import CliRunner

    from bitlm.cli import main

    result = CliRunner().invoke(main, ["train", "--local", "--data", str(cli_dirs / "data"), "--out",
                                       str(cli_dirs / "never"), "--auto-collapse", "--collapse-floors", "q=1"])
    assert result.exit_code == 2 and "--collapse-floors" in result.output and not (cli_dirs / "never").exists()
