"""Checkpoints written by the code before the design pass (commit 83d5546, fixtures/checkpoint-83d5546/make.py) still load."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from bitlm import checkpoint as ckpt
from bitlm.config import TrainConfig
from bitlm.data import Corpus
from bitlm.engine import fit
from bitlm.model import BitTransformerLM
from bitlm.objective import model_inputs

ROOT = Path(__file__).parent / "fixtures" / "checkpoint-83d5546"
TEXT = b"".join(b"%d: the quick brown fox jumps over the lazy dog.\n" % i for i in range(60))
PROBE = torch.tensor([list(b"the quick brown fox jump")], dtype=torch.uint8)


@pytest.mark.parametrize("kind", ["flat", "patched", "byte"])
def test_an_old_checkpoint_gives_the_logits_it_gave_when_written(kind):
    directory = ROOT / kind / "step-00000003"
    assert ckpt.checkpoint_problem(directory) is None
    model = ckpt.from_pretrained(directory).eval()
    with torch.no_grad():
        logits = model(model_inputs(model, PROBE))[0]
    expected = json.loads((ROOT / "expected_logits.json").read_text())[kind]
    torch.testing.assert_close(logits.flatten()[:64], torch.tensor(expected), atol=1e-6, rtol=1e-5)


def test_the_old_config_key_model_checkpoint_activations_is_accepted():
    saved = json.loads((ROOT / "flat" / "step-00000003" / "config.json").read_text())
    assert saved["model"]["checkpoint_activations"] is True  # written before the key moved to parallel.
    assert ckpt.read_config(ROOT / "flat" / "step-00000003").n_layers == 2


def test_training_resumes_from_an_old_checkpoint(tmp_path):
    shutil.copytree(ROOT / "patched", tmp_path / "patched")
    corpus = Corpus.from_bytes(TEXT, window_bytes=32, val_fraction=0.25)
    model = BitTransformerLM(ckpt.read_config(tmp_path / "patched" / "step-00000003"))
    train = TrainConfig(batch_size=4, context_bytes=16, max_steps=5, warmup_steps=1, log_every=1, eval_every=5,
                        eval_batches=1)
    steps = []
    result = fit(model, corpus, train, checkpoint_dir=tmp_path / "patched",
                 report=lambda metrics, path: steps.append(metrics["step"]))
    assert steps[0] == 4 and result.step == 5  # continued after step 3
    assert (tmp_path / "patched" / "step-00000005").is_dir()
