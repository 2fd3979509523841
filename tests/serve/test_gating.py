"""Per-job isolation of a gated batch: one failing job fails only its own caller."""

from __future__ import annotations

import pytest
import torch

from bitlm.config import ModelConfig
from bitlm.model import BitTransformerLM
from serve.gating import Job, Outcome, run_gated, run_gated_isolated

# these models carry no corpus marginals; S is irrelevant with s_floor 0
pytestmark = pytest.mark.filterwarnings("ignore:model.reference_marginals")


def _job(mode: str, seed: int, sampling_unit=None) -> Job:
    return Job(prompt=b"To be", max_new_bytes=6, mode=mode, temperature=1.0, top_k=None, top_p=None,
               diffusion_steps=4, schedule="cosine", seed=seed, c_floor=0.0, s_floor=0.0, max_retries=0,
               sampling_unit=sampling_unit)


@pytest.fixture(scope="module")
def causal_model():
    torch.manual_seed(0)
    return BitTransformerLM(ModelConfig.from_name("tiny", kind="patched")).eval()


def test_a_failing_job_gets_its_exception_and_the_others_their_batch_result(causal_model):
    good, bad = _job("causal", 1), _job("diffusion", 2)  # a causal model cannot run a diffusion job
    with pytest.raises(ValueError):
        run_gated(causal_model, [good, bad])  # the shared pass fails for everyone
    outcomes = run_gated_isolated(causal_model, [good, bad, _job("causal", 3)])
    assert isinstance(outcomes[1], ValueError) and "non-causal" in str(outcomes[1])
    alone = [run_gated(causal_model, [job])[0] for job in (good, _job("causal", 3))]
    for got, expected in zip((outcomes[0], outcomes[2]), alone):
        assert isinstance(got, Outcome) and got.new_bytes == expected.new_bytes


def test_a_batch_that_succeeds_is_returned_as_is_and_a_lone_failure_raises(causal_model):
    jobs = [_job("causal", 5), _job("causal", 6)]
    assert [o.new_bytes for o in run_gated_isolated(causal_model, jobs)] == \
        [o.new_bytes for o in run_gated(causal_model, jobs)]
    with pytest.raises(ValueError, match="non-causal"):
        run_gated_isolated(causal_model, [_job("diffusion", 7)])


@pytest.mark.parametrize("unit", [None, "bit", "byte"])
def test_a_batched_job_samples_in_its_unit_as_generate_ids_does(causal_model, unit):
    from bitlm.sampling import generate_ids, prompt_ids, to_generation

    jobs = [_job("causal", 7, unit), _job("causal", 8, unit)]
    got = [o.new_bytes for o in run_gated(causal_model, jobs)]
    ids = prompt_ids(causal_model.config, b"To be")[None]
    for job, new in zip(jobs, got):
        out = generate_ids(causal_model, ids, 6 * 9, row_seeds=[job.seed], sampling_unit=unit or "byte")
        assert new == to_generation(causal_model.config, b"To be", out[0, ids.shape[1]:]).new_bytes


def test_jobs_in_different_units_do_not_share_a_batch():
    assert _job("causal", 1, "bit").batch_key() != _job("causal", 1, "byte").batch_key()
