"""Checks shared by the model test files."""

import torch


def assert_incremental_decoding_equals_full_forward(model, x: torch.Tensor, prompt_bits: int = 22) -> None:
    """Decoding x id by id after a prompt of `prompt_bits` ids (for a bit model, e.g. ending inside a
    byte) gives the full forward's logits."""
    full, _ = model(x)
    state, first = model.start_decoding(x[:, :prompt_bits])
    pieces = [first]
    for t in range(prompt_bits, x.shape[1] - 1):
        pieces.append(model.decode_next(state, x[:, t]))
    torch.testing.assert_close(torch.stack(pieces, dim=1), full[:, prompt_bits - 1:-1], atol=1e-5, rtol=1e-4)
