"""bitlm.pattern_joint: the bits' conditionals of a byte read from one joint over its patterns, and
the hand-written backward of the training path against autograd's through the whole tree."""

import pytest
import torch

from bitlm.pattern_joint import joint_path_scores, path_scores, tree_masses


def _path_nodes(values: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n) tree node of each phase j on pattern `values`' path: 2^j - 1 + its first j bits."""
    j = torch.arange(n)
    return 2 ** j - 1 + (values[..., None] >> (n - j))


@pytest.mark.parametrize("n", [1, 2, 8, 9])
@pytest.mark.parametrize("scale", [1.0, 60.0, 500.0])  # 500: most masses beyond float32, clamped
def test_joint_path_scores_and_their_gradients_equal_autograd_through_the_tree(n, scale):
    generator = torch.Generator().manual_seed(n)
    logits = torch.randn(3, 17, 2 ** n, generator=generator) * scale
    values = torch.randint(0, 2 ** n, (3, 17), generator=generator)
    upstream = torch.randn(3, 17, n, generator=generator)
    reference = logits.clone().requires_grad_()
    expected = path_scores(tree_masses(reference), _path_nodes(values, n))
    (expected * upstream).sum().backward()
    fast = logits.clone().requires_grad_()
    scores = joint_path_scores(fast, values)
    (scores * upstream).sum().backward()
    torch.testing.assert_close(scores, expected, rtol=0, atol=0)
    torch.testing.assert_close(fast.grad, reference.grad, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(fast.grad).all()


def test_joint_path_scores_ignore_the_last_bit_and_are_log_mass_ratios():
    logits = torch.randn(2, 512, dtype=torch.float64)  # the masses are float32 whatever the logits
    values = torch.tensor([0b101100110, 0b011111111])
    scores = joint_path_scores(logits, values)
    torch.testing.assert_close(scores, joint_path_scores(logits, values ^ 1))  # no score reads the last bit
    for row in range(2):
        for j in range(9):
            prefix = int(values[row]) >> (9 - j)
            width = 2 ** (8 - j)  # patterns below each child of node (j, prefix)
            start = 2 * prefix * width
            one, zero = logits[row, start + width:start + 2 * width], logits[row, start:start + width]
            torch.testing.assert_close(scores[row, j], one.logsumexp(0) - zero.logsumexp(0), atol=1e-5, rtol=1e-5)


def test_joint_path_scores_keep_the_logits_dtype_and_pass_gradients_in_it():
    logits = torch.randn(4, 512).bfloat16().requires_grad_()
    scores = joint_path_scores(logits, torch.randint(0, 512, (4,)))
    scores.sum().backward()
    assert scores.dtype == torch.bfloat16 and logits.grad.dtype == torch.bfloat16
