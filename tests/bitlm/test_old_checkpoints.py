"""Checkpoints written by the code before the design pass (commit 83d5546) still load.

The old code is taken from this clone's own history (`git archive`), and writes the checkpoints and the
logits it computed with write_checkpoints_83d5546.py at test time, so no weights are kept in the repo.
"""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from bitlm import checkpoint as ckpt
from bitlm.config import TrainConfig
from bitlm.data import Corpus
from bitlm.engine import fit
from bitlm.model import BitTransformerLM
from bitlm.objective import model_inputs

OLD_COMMIT = "83d55466492889cb52ed1ec3015bc480bb4b56f0"
WRITER = Path(__file__).with_name("write_checkpoints_83d5546.py")
TEXT = b"".join(b"%d: the quick brown fox jumps over the lazy dog.\n" % i for i in range(60))
PROBE = torch.tensor([list(b"the quick brown fox jump")], dtype=torch.uint8)


@pytest.fixture(scope="module")
def old_checkpoints(tmp_path_factory) -> Path:
    """The directory of checkpoints (flat, patched, byte) and expected_logits.json written by the old code."""
    repo = Path(__file__).resolve().parents[2]
    present = subprocess.run(["git", "-C", str(repo), "cat-file", "-e", f"{OLD_COMMIT}^{{commit}}"],
                             capture_output=True)
    if present.returncode != 0:
        pytest.skip(f"commit {OLD_COMMIT[:7]} is not in this clone's history (a shallow clone?)")
    work = tmp_path_factory.mktemp("old-code")
    archive = work / "old.tar"
    subprocess.run(["git", "-C", str(repo), "archive", "-o", str(archive), OLD_COMMIT, "bitlm"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(work / "src", filter="data")
    out = work / "checkpoints"
    env = {**os.environ, "PYTHONPATH": str(work / "src"), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(WRITER), str(out)], check=True, cwd=work, env=env, capture_output=True)
    return out


@pytest.mark.parametrize("kind", ["flat", "patched", "byte"])
def test_an_old_checkpoint_gives_the_logits_it_gave_when_written(old_checkpoints, kind):
    directory = old_checkpoints / kind / "step-00000003"
    assert ckpt.checkpoint_problem(directory) is None
    model = ckpt.from_pretrained(directory).eval()
    with torch.no_grad():
        logits = model(model_inputs(model, PROBE))[0]
    expected = json.loads((old_checkpoints / "expected_logits.json").read_text())[kind]
    torch.testing.assert_close(logits.flatten()[:64], torch.tensor(expected), atol=1e-6, rtol=1e-5)


def test_the_old_config_keys_are_accepted(old_checkpoints):
    saved = json.loads((old_checkpoints / "flat" / "step-00000003" / "config.json").read_text())
    assert saved["model"]["checkpoint_activations"] is True  # written before the key moved to parallel.
    assert saved["model"]["max_seq_len"] == 32 * 9  # before the rename to max_positions
    loaded = ckpt.read_config(old_checkpoints / "flat" / "step-00000003")
    assert (loaded.n_layers, loaded.max_positions) == (2, 32 * 9)


def test_training_resumes_from_an_old_checkpoint(old_checkpoints, tmp_path):
    shutil.copytree(old_checkpoints / "patched", tmp_path / "patched")
    corpus = Corpus.from_bytes(TEXT, window_bytes=32, val_fraction=0.25)
    model = BitTransformerLM(ckpt.read_config(tmp_path / "patched" / "step-00000003"))
    train = TrainConfig(batch_size=4, context_bytes=16, max_steps=5, warmup_steps=1, log_every=1, eval_every=5,
                        eval_batches=1)
    steps = []
    result = fit(model, corpus, train, checkpoint_dir=tmp_path / "patched",
                 report=lambda metrics, path: steps.append(metrics["step"]))
    assert steps[0] == 4 and result.step == 5  # continued after step 3
    assert (tmp_path / "patched" / "step-00000005").is_dir()
