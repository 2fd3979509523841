"""Tests for bitlm.corpus_sources: the stream plan and span reads that prepare_corpus and the Ray job share."""

from pathlib import Path

import numpy as np
import pytest

from bitlm.corpus_sources import plan_stream, read_stream


@pytest.fixture
def files(tmp_path) -> list[Path]:
    sizes = [10, 0, 7, 1, 25]
    paths = []
    for i, n in enumerate(sizes):
        path = tmp_path / f"f{i}.txt"
        path.write_bytes(bytes([65 + i]) * n)
        paths.append(path)
    return paths


def test_full_read_joins_files_with_newlines(files):
    plan = plan_stream(files)
    assert read_stream(plan).tobytes() == b"\n".join(p.read_bytes() for p in files)
    assert plan.n_files == 5 and plan.n_bytes == 43 + 4


@pytest.mark.parametrize("step", [1, 3, 11, 100])
def test_span_reads_concatenate_to_the_full_read(files, step):
    plan = plan_stream(files)
    spans = [read_stream(plan, a, min(a + step, plan.n_bytes)) for a in range(0, plan.n_bytes, step)]
    np.testing.assert_array_equal(np.concatenate(spans), read_stream(plan))


def test_max_bytes_ending_on_a_separator_counts_the_next_file(files):
    # f0 is 10 bytes; byte 10 is the separator before the empty f1, byte 11 the one before f2.
    assert plan_stream(files, 10).n_files == 1
    assert plan_stream(files, 11).n_files == 2
    plan = plan_stream(files, 12)
    assert plan.n_files == 3 and read_stream(plan).tobytes() == b"A" * 10 + b"\n\n"


def test_file_that_grew_is_cut_at_its_planned_size(files):
    plan = plan_stream(files)
    before = read_stream(plan).tobytes()
    files[2].write_bytes(b"C" * 50)
    assert read_stream(plan).tobytes() == before


def test_file_that_shrank_raises_naming_it(files):
    plan = plan_stream(files)
    files[4].write_bytes(b"E" * 3)
    with pytest.raises(ValueError, match="f4.txt.*changed while being read"):
        read_stream(plan, 20)


def test_span_outside_the_stream_is_rejected(files):
    plan = plan_stream(files)
    with pytest.raises(ValueError, match="span"):
        read_stream(plan, 5, plan.n_bytes + 1)
