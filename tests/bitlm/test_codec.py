"""Tests for bitlm.codec: text/bytes <-> bit streams, parity, packing and the torch helpers."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitlm.codec import (
    bit_table,
    bit_tensor_to_bytes,
    bits_per_byte,
    bits_to_bytes,
    bits_to_text,
    bytes_to_bit_tensor,
    bytes_to_bits,
    enforce_parity,
    pack_bits,
    text_to_bits,
    unpack_bits,
)


@given(st.text())
def test_text_round_trips_with_parity(text):
    assert bits_to_text(text_to_bits(text, parity=True), parity=True) == text


@given(st.text())
def test_text_round_trips_without_parity(text):
    assert bits_to_text(text_to_bits(text, parity=False), parity=False) == text


@given(st.binary(), st.booleans())
def test_bytes_round_trip(data, parity):
    bits = bytes_to_bits(data, parity=parity)
    assert bits.dtype == np.uint8 and bits.ndim == 1
    assert bits.size == len(data) * bits_per_byte(parity)
    assert bits_to_bytes(bits, parity=parity) == data


@given(st.binary(min_size=1))
def test_every_nine_bit_group_has_even_popcount(data):
    groups = bytes_to_bits(data, parity=True).reshape(-1, 9)
    assert np.all(groups.sum(axis=1) % 2 == 0)


def test_bits_per_byte_is_nine_with_parity_and_eight_without():
    assert bits_per_byte(True) == 9
    assert bits_per_byte(False) == 8


def test_known_vector_for_letter_a():
    assert text_to_bits("A").tolist() == [0, 1, 0, 0, 0, 0, 0, 1, 0]
    assert text_to_bits("A", parity=False).tolist() == [0, 1, 0, 0, 0, 0, 0, 1]


def test_odd_popcount_byte_gets_parity_one():
    # 0x43 = 01000011 has three ones.
    assert text_to_bits("C").tolist() == [0, 1, 0, 0, 0, 0, 1, 1, 1]


def test_bytes_to_bits_accepts_uint8_array_and_bytearray():
    data = b"\x00\xff\x5a"
    expected = bytes_to_bits(data)
    np.testing.assert_array_equal(bytes_to_bits(np.frombuffer(data, dtype=np.uint8)), expected)
    np.testing.assert_array_equal(bytes_to_bits(bytearray(data)), expected)


def test_empty_text_maps_to_empty_bits_and_back():
    assert text_to_bits("").size == 0
    assert bits_to_text(np.zeros(0, dtype=np.uint8)) == ""
    assert bits_to_text([]) == ""


def test_non_binary_value_names_index_value_and_count():
    bits = text_to_bits("AB").astype(np.int64)
    bits[4] = 2
    bits[11] = -1
    with pytest.raises(ValueError, match=r"index 4 has value 2 \(2 bad values"):
        bits_to_text(bits)


def test_wrong_length_names_length_and_bits_per_byte():
    with pytest.raises(ValueError, match=r"length 10 is not a multiple of 9"):
        bits_to_bytes(np.zeros(10, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"length 10 is not a multiple of 8"):
        bits_to_bytes(np.zeros(10, dtype=np.uint8), parity=False)


def test_parity_error_names_first_bad_byte_and_count():
    bits = text_to_bits("hello").copy()
    bits[2 * 9 + 8] ^= 1
    bits[4 * 9 + 3] ^= 1
    with pytest.raises(ValueError, match=r"parity error at byte 2 .*2 bytes have a wrong parity bit"):
        bits_to_text(bits)


def test_invalid_utf8_strict_names_byte_offset():
    bits = bytes_to_bits(b"ok\xffok")
    with pytest.raises(ValueError, match=r"invalid UTF-8 at byte offset 2"):
        bits_to_text(bits)


def test_errors_replace_substitutes_replacement_character():
    assert bits_to_text(bytes_to_bits(b"ok\xffok"), errors="replace") == "ok\ufffdok"


def test_unknown_errors_mode_is_rejected():
    with pytest.raises(ValueError, match=r"errors must be 'strict' or 'replace'"):
        bits_to_text(text_to_bits("x"), errors="ignore")


def test_repair_ignores_a_flipped_parity_bit():
    bits = text_to_bits("parity").copy()
    bits[3 * 9 + 8] ^= 1
    assert bits_to_text(bits, repair=True) == "parity"


@given(st.binary(min_size=1, max_size=200), st.data())
def test_enforce_parity_counts_each_flipped_parity_bit(data, draw):
    clean = bytes_to_bits(data)
    flipped = draw.draw(st.sets(st.integers(0, len(data) - 1)))
    noisy = clean.copy()
    noisy[np.array(sorted(flipped), dtype=np.int64) * 9 + 8] ^= 1
    fixed, n_corrected = enforce_parity(noisy)
    assert n_corrected == len(flipped)
    np.testing.assert_array_equal(fixed, clean)


def test_enforce_parity_leaves_data_bits_untouched():
    rng = np.random.default_rng(1)
    noisy = rng.integers(0, 2, 9 * 64).astype(np.uint8)
    fixed, _ = enforce_parity(noisy)
    data_cols = np.arange(noisy.size) % 9 != 8
    np.testing.assert_array_equal(fixed[data_cols], noisy[data_cols])
    assert np.all(fixed.reshape(-1, 9).sum(axis=1) % 2 == 0)


def test_enforce_parity_does_not_modify_its_input():
    noisy = np.ones(9, dtype=np.uint8)
    enforce_parity(noisy)
    assert noisy.tolist() == [1] * 9


def test_enforce_parity_rejects_length_and_values():
    with pytest.raises(ValueError, match=r"length 8 is not a multiple of 9"):
        enforce_parity(np.zeros(8, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"index 0 has value 3"):
        enforce_parity([3] + [0] * 8)


def test_enforce_parity_accepts_torch_tensor():
    noisy = torch.tensor(text_to_bits("ab").astype(np.int64))
    noisy[8] ^= 1
    fixed, n_corrected = enforce_parity(noisy)
    assert n_corrected == 1
    np.testing.assert_array_equal(fixed, text_to_bits("ab"))


@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.uint8, torch.bool])
def test_torch_tensor_input_decodes(dtype):
    bits = torch.tensor(text_to_bits("tensor\u00e9").astype(np.int64)).to(dtype)
    assert bits_to_text(bits) == "tensor\u00e9"


def test_batched_torch_tensor_is_flattened():
    bits = torch.tensor(text_to_bits("ab").reshape(2, 9).astype(np.int64))
    assert bits_to_text(bits) == "ab"


def test_list_and_bool_inputs_decode():
    assert bits_to_text(text_to_bits("q").tolist()) == "q"
    assert bits_to_text(text_to_bits("q").astype(bool)) == "q"


def test_float_array_with_non_binary_value_is_rejected():
    with pytest.raises(ValueError, match=r"index 1 has value 0.5"):
        bits_to_bytes(np.array([0, 0.5, 0, 0, 0, 0, 0, 0]), parity=False)


@given(st.lists(st.integers(0, 1)))
def test_pack_unpack_round_trip(bits):
    packed = pack_bits(bits)
    assert len(packed) == (len(bits) + 7) // 8
    assert unpack_bits(packed, len(bits)).tolist() == bits


def test_pack_bits_is_msb_first():
    assert pack_bits([1, 0, 0, 0, 0, 0, 0, 1, 1]) == b"\x81\x80"


def test_unpack_rejects_more_bits_than_packed():
    with pytest.raises(ValueError, match=r"n_bits=17 is outside \[0, 16\]"):
        unpack_bits(b"\x00\x00", 17)


@pytest.mark.parametrize("parity", [True, False])
def test_bit_table_rows_are_byte_bits(parity):
    table = bit_table(parity)
    assert table.dtype == torch.long and table.shape == (256, bits_per_byte(parity))
    expected = bytes_to_bits(bytes(range(256)), parity=parity).reshape(256, -1)
    np.testing.assert_array_equal(table.numpy(), expected)


def test_bit_table_is_cached_per_parity_and_device():
    assert bit_table(True) is bit_table(True, "cpu")
    assert bit_table(True) is not bit_table(False)


@pytest.mark.parametrize("parity", [True, False])
@pytest.mark.parametrize("shape", [(7,), (3, 11), (2, 4, 5)])
def test_bytes_to_bit_tensor_matches_numpy_codec(parity, shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, shape, generator=gen)
    bits = bytes_to_bit_tensor(x, parity=parity)
    bpb = bits_per_byte(parity)
    assert bits.dtype == torch.long and bits.shape == (*shape[:-1], shape[-1] * bpb)
    rows = x.reshape(-1, shape[-1]).to(torch.uint8).numpy()
    expected = np.stack([bytes_to_bits(row, parity=parity) for row in rows])
    np.testing.assert_array_equal(bits.reshape(-1, shape[-1] * bpb).numpy(), expected)


@pytest.mark.parametrize("parity", [True, False])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.long])
def test_bit_tensor_to_bytes_inverts_bytes_to_bit_tensor(parity, dtype):
    x = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1)).to(dtype)
    back = bit_tensor_to_bytes(bytes_to_bit_tensor(x, parity=parity), parity=parity)
    assert back.dtype == torch.long
    assert torch.equal(back, x.long())


def test_bit_tensor_to_bytes_rejects_partial_byte():
    with pytest.raises(ValueError, match=r"not a multiple of 9"):
        bit_tensor_to_bytes(torch.zeros(2, 10, dtype=torch.long))


def test_bytes_to_bit_tensor_rejects_out_of_range_and_float():
    with pytest.raises(ValueError, match=r"index \(1, 0\) has value 256"):
        bytes_to_bit_tensor(torch.tensor([[1, 2], [256, 3]]))
    with pytest.raises(ValueError, match=r"integer dtype"):
        bytes_to_bit_tensor(torch.zeros(3))


@settings(max_examples=25)
@given(st.text(min_size=1))
def test_torch_path_agrees_with_text_codec(text):
    raw = torch.tensor(list(text.encode("utf-8")))
    np.testing.assert_array_equal(bytes_to_bit_tensor(raw).numpy(), text_to_bits(text))
