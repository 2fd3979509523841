"""Tests for bitlm.compression: gamma-coded run-length streams, single and batched, and their validation."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitlm.codec import text_to_bits
from bitlm.compression import (
    compress_batch,
    compress_bits,
    compression_ratio,
    decompress_batch,
    decompress_bits,
)


def reference_compress(bits):
    """The stream format written out with Python loops: first bit, gamma(runs + 1), gamma(each run)."""
    bits = [int(b) for b in bits]
    runs = []
    for i, b in enumerate(bits):
        if i and b == bits[i - 1]:
            runs[-1] += 1
        else:
            runs.append(1)
    out = [bits[0] if bits else 0]
    for value in [len(runs) + 1] + runs:
        m = value.bit_length()
        out += [0] * (m - 1) + [(value >> k) & 1 for k in range(m - 1, -1, -1)]
    return np.array(out, dtype=np.uint8)


def runs_of(draw_runs):
    """Bits built from (bit, run length) pairs, so long runs are as likely as short ones."""
    return [b for b, n in draw_runs for _ in range(n)]


bit_lists = st.one_of(
    st.lists(st.integers(0, 1), max_size=3000),
    st.lists(st.tuples(st.integers(0, 1), st.integers(1, 2000)), max_size=8).map(runs_of),
)


@given(bit_lists)
def test_round_trip_single(bits):
    stream = compress_bits(bits)
    assert stream.dtype == np.uint8 and stream.ndim == 1
    assert set(np.unique(stream)) <= {0, 1}
    out = decompress_bits(stream)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.array(bits, dtype=np.uint8))


@given(st.lists(bit_lists, max_size=6))
def test_round_trip_batch_of_ragged_rows(rows):
    streams = compress_batch(rows)
    assert len(streams) == len(rows)
    for row, stream, out in zip(rows, streams, decompress_batch(streams)):
        np.testing.assert_array_equal(stream, compress_bits(row))
        np.testing.assert_array_equal(out, np.array(row, dtype=np.uint8))


@given(st.integers(1, 5), st.integers(0, 300), st.randoms(use_true_random=False))
def test_round_trip_2d_array_and_tensor(n_rows, width, rnd):
    rng = np.random.default_rng(rnd.getrandbits(32))
    # Rows of different character: random, constant, and sparse, to cross row breaks in every way.
    x = rng.integers(0, 2, (n_rows, width)).astype(np.uint8)
    x[0] = 1
    if n_rows > 1:
        x[1] = rng.random(width) < 0.02
    for batch in (x, torch.from_numpy(x).long(), torch.from_numpy(x).bool()):
        streams = compress_batch(batch)
        assert len(streams) == n_rows
        for row, out in zip(x, decompress_batch(streams)):
            np.testing.assert_array_equal(out, row)


@settings(max_examples=50)
@given(st.integers(0, 2**32 - 1))
def test_batch_encoder_matches_python_reference(seed):
    rng = np.random.default_rng(seed)
    rows = [(rng.random(int(rng.integers(0, 500))) < rng.random()).astype(np.uint8) for _ in range(4)]
    for row, stream in zip(rows, compress_batch(rows)):
        np.testing.assert_array_equal(stream, reference_compress(row))


def test_known_encodings():
    assert compress_bits([]).tolist() == [0, 1]
    assert compress_bits([0]).tolist() == [0, 0, 1, 0, 1]
    assert compress_bits([1]).tolist() == [1, 0, 1, 0, 1]
    # Two runs (count code gamma(3) = 011), lengths 2 -> 010 and 3 -> 011.
    assert compress_bits([0, 0, 1, 1, 1]).tolist() == [0, 0, 1, 1, 0, 1, 0, 0, 1, 1]


@pytest.mark.parametrize("bits", [[], [0], [1]])
def test_tiny_inputs_round_trip(bits):
    out = decompress_bits(compress_bits(bits))
    assert out.tolist() == bits
    assert decompress_batch(compress_batch([bits]))[0].tolist() == bits


def test_empty_batch():
    assert compress_batch([]) == []
    assert decompress_batch([]) == []
    assert [s.tolist() for s in compress_batch(np.zeros((3, 0), dtype=np.uint8))] == [[0, 1]] * 3


def test_all_zeros_compresses_well():
    bits = np.zeros(10_000, dtype=np.uint8)
    stream = compress_bits(bits)
    assert compression_ratio(bits.size, stream.size) < 0.01
    np.testing.assert_array_equal(decompress_bits(stream), bits)


def test_alternating_bits_expand_but_round_trip():
    bits = np.arange(10_000) % 2
    stream = compress_bits(bits)
    assert compression_ratio(bits.size, stream.size) > 1
    np.testing.assert_array_equal(decompress_bits(stream), bits)


def test_long_runs_past_the_bit_length_table():
    bits = np.concatenate([np.zeros(70_000), np.ones(3), np.zeros(2**16), np.ones(2**16 - 1)]).astype(np.uint8)
    stream = compress_bits(bits)
    np.testing.assert_array_equal(stream, reference_compress(bits))
    np.testing.assert_array_equal(decompress_bits(stream), bits)


def test_text_bits_round_trip():
    text = "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 20
    for parity in (True, False):
        bits = text_to_bits(text, parity=parity)
        np.testing.assert_array_equal(decompress_bits(compress_bits(bits)), bits)
        np.testing.assert_array_equal(compress_bits(bits), reference_compress(bits))


def test_inputs_accept_list_numpy_and_torch():
    bits = [1, 1, 0, 1, 0, 0, 0]
    expected = compress_bits(bits)
    for form in (np.array(bits), torch.tensor(bits), torch.tensor(bits, dtype=torch.bfloat16),
                 np.array(bits, dtype=bool)):
        np.testing.assert_array_equal(compress_bits(form), expected)
        np.testing.assert_array_equal(decompress_bits(torch.from_numpy(expected)), bits)


def test_bad_input_values_name_the_index():
    with pytest.raises(ValueError, match="index 2 has value 2"):
        compress_bits([0, 1, 2, 1])
    with pytest.raises(ValueError, match=r"row 1: .*index 3 has value -1"):
        compress_batch(np.array([[0, 1, 0, 1], [1, 1, 1, -1]]))
    with pytest.raises(ValueError, match=r"row 0: .*index 0 has value 0.5"):
        compress_batch([[0.5], [1]])
    with pytest.raises(ValueError, match="must be 2-D"):
        compress_batch(np.zeros(4))


def test_stream_values_outside_0_1_are_rejected():
    stream = compress_bits([0, 1, 1]).astype(np.int64)
    stream[3] = 7
    with pytest.raises(ValueError, match="index 3 has value 7"):
        decompress_bits(stream)
    with pytest.raises(ValueError, match=r"stream 1: .*index 3 has value 7"):
        decompress_batch([compress_bits([1]), stream])


def _sample_stream():
    rng = np.random.default_rng(1)
    bits = np.repeat(rng.integers(0, 2, 60), rng.integers(1, 40, 60)).astype(np.uint8)
    return bits, compress_bits(bits)


def test_truncated_streams_raise():
    _, stream = _sample_stream()
    for cut in [0, 1, 2, 5, stream.size // 3, stream.size // 2, stream.size - 2, stream.size - 1]:
        with pytest.raises(ValueError, match=r"truncated|stream is empty|exceeds") as info:
            decompress_bits(stream[:cut])
        assert "offset" in str(info.value)


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        ([0, 0], "run-count code at bit offset 1 has no terminating 1 bit"),
        ([0, 0, 0, 1, 1], "run-count code at bit offset 1 needs 6 bits, the stream has 5"),
        ([0, 0, 1, 1, 0, 1, 0], "stream ends at bit offset 7 after 1 of 2 run codes"),
        ([0, 0, 1, 1, 1, 0, 0], "run code 1 of 2 at bit offset 5 has no terminating 1 bit"),
        ([0, 0, 1, 1, 0, 0, 1, 0], "run code 0 of 2 at bit offset 4 needs bits up to offset 9, the stream has 8"),
    ],
)
def test_truncation_messages_say_what_and_where(stream, message):
    with pytest.raises(ValueError, match=f"^truncated: .*{message}"):
        decompress_bits(stream)


def test_trailing_bits_raise():
    bits, stream = _sample_stream()
    for tail in ([0], [1], [1, 0, 1], [0] * 9):
        with pytest.raises(ValueError, match=f"trailing bits: {len(tail)} bits after .* offset {stream.size}"):
            decompress_bits(np.concatenate([stream, tail]))
    with pytest.raises(ValueError, match="trailing bits"):
        decompress_bits([0, 1, 0])  # an empty input's stream plus one bit


def test_inconsistent_header_raises():
    with pytest.raises(ValueError, match="first bit .* is 1 but the run count is 0"):
        decompress_bits([1, 1])
    with pytest.raises(ValueError, match=r"run count \d+ .* exceeds"):
        decompress_bits([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])  # claims 14 runs, holds 2 bits


def test_over_long_codes_raise_instead_of_overflowing():
    with pytest.raises(ValueError, match="63 leading zeros"):
        decompress_bits([0] + [0] * 63 + [1] * 64)
    # One run whose code has 63 leading zeros: 2**63 does not fit in int64.
    with pytest.raises(ValueError, match=r"run code 0 at bit offset 4 has 63 leading zeros"):
        decompress_bits([0, 0, 1, 0] + [0] * 63 + [1] * 64)


def test_max_bits_refuses_large_outputs():
    stream = compress_bits(np.zeros(5000, dtype=np.uint8))
    assert decompress_bits(stream, max_bits=5000).size == 5000
    with pytest.raises(ValueError, match="decodes to 5000 bits, more than max_bits=4999"):
        decompress_bits(stream, max_bits=4999)
    with pytest.raises(ValueError, match="max_bits must be non-negative"):
        decompress_bits(stream, max_bits=-1)
    # Each run's code is well formed, but together they claim more than int64 can count.
    huge = [0, 0, 0, 1, 0, 1] + ([0] * 61 + [1] + [0] * 61) * 4  # four runs of 2**61 bits
    with pytest.raises(ValueError, match=r"decoded length exceeds 2\*\*62 bits"):
        decompress_bits(huge)


def test_every_single_bit_flip_raises_or_reencodes_to_itself():
    # Every valid stream encodes exactly one input, so a flipped stream that decodes must be
    # that input's encoding: the flip can never pass silently as the original input.
    bits, stream = _sample_stream()
    for i in range(stream.size):
        flipped = stream.copy()
        flipped[i] ^= 1
        try:
            out = decompress_bits(flipped)
        except ValueError as exc:
            assert "offset" in str(exc) or "max_bits" in str(exc) or "2**62" in str(exc)
            continue
        assert not np.array_equal(out, bits)
        np.testing.assert_array_equal(compress_bits(out), flipped)


@settings(max_examples=200)
@given(st.lists(st.integers(0, 1), min_size=1, max_size=200), st.data())
def test_corrupt_streams_only_raise_value_error(bits, data):
    stream = compress_bits(bits)
    edit = data.draw(st.sampled_from(["flip", "cut", "append", "insert"]))
    i = data.draw(st.integers(0, stream.size - 1))
    if edit == "flip":
        stream[i] ^= 1
    elif edit == "cut":
        stream = stream[:i]
    elif edit == "append":
        stream = np.concatenate([stream, data.draw(st.lists(st.integers(0, 1), min_size=1, max_size=70))])
    else:
        stream = np.insert(stream, i, data.draw(st.integers(0, 1)))
    try:
        out = decompress_bits(stream)
    except ValueError:
        return
    np.testing.assert_array_equal(compress_bits(out), stream)


def test_batch_errors_name_the_stream():
    _, stream = _sample_stream()
    with pytest.raises(ValueError, match=r"^stream 2: truncated"):
        decompress_batch([stream, stream, stream[:-3]])


def test_compression_ratio():
    assert compression_ratio(100, 25) == 0.25
    assert compression_ratio(8, 16) == 2.0
    with pytest.raises(ValueError, match="original_bits must be positive"):
        compression_ratio(0, 3)
    with pytest.raises(ValueError, match="compressed_bits must be non-negative"):
        compression_ratio(3, -1)
