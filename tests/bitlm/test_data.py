"""Tests for bitlm.data: corpus preparation, manifests and window readers."""

import json
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bitlm.data import ByteWindows, Corpus, prepare_corpus, split_windows

WB = 64


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def tree(tmp_path):
    """Sources mixing a directory, a glob and a single file; returns (sources, expected stream)."""
    rng = np.random.default_rng(0)
    blob = lambda n: rng.integers(0, 256, n, dtype=np.uint8).tobytes()  # noqa: E731
    src = tmp_path / "src"
    files = [
        _write(src / "tree" / "a.txt", blob(700)),
        _write(src / "tree" / "sub" / "b.py", blob(1300)),
        _write(src / "tree" / "sub" / "deep" / "c.md", blob(901)),
        _write(src / "globbed" / "x.dat", blob(555)),
        _write(src / "globbed" / "y.dat", blob(444)),
        _write(src / "single.log", blob(333)),
    ]
    _write(src / "tree" / "ignored.bin", blob(100))  # not matched by the include patterns
    sources = [str(src / "tree"), str(src / "globbed" / "*.dat"), str(src / "single.log"),
               str(src / "tree" / "sub" / ".." / "a.txt")]  # a.txt again: de-duplicated
    ordered = sorted(files, key=lambda p: str(p.resolve()))
    return sources, b"\n".join(p.read_bytes() for p in ordered)


def _prepare(sources, out, **kw):
    kw.setdefault("window_bytes", WB)
    kw.setdefault("progress", False)
    return prepare_corpus(sources, out, **kw)


def test_prepare_is_deterministic(tree, tmp_path):
    sources, _ = tree
    m1 = _prepare(sources, tmp_path / "a", shard_windows=5)
    m2 = _prepare(sources, tmp_path / "b", shard_windows=5)
    assert m1 == m2
    assert json.loads((tmp_path / "a" / "manifest.json").read_text()) == m1
    for shard in m1["splits"]["train"]["shards"] + m1["splits"]["val"]["shards"]:
        assert (tmp_path / "a" / shard["file"]).read_bytes() == (tmp_path / "b" / shard["file"]).read_bytes()


def test_prepare_preserves_bytes_across_shards(tree, tmp_path):
    sources, stream = tree
    m = _prepare(sources, tmp_path / "c", shard_windows=4)
    corpus = Corpus.open(tmp_path / "c")
    n_train = m["splits"]["train"]["n_bytes"] + m["splits"]["train"]["n_bytes_dropped"]
    assert corpus.train.to_numpy().tobytes() == stream[:corpus.train.n_bytes]
    assert corpus.val.to_numpy().tobytes() == stream[n_train:n_train + corpus.val.n_bytes]
    assert m["n_bytes_total"] == len(stream)
    assert m["n_files"] == 6
    assert len(m["splits"]["train"]["shards"]) > 1


def test_split_sizes_follow_val_fraction(tree, tmp_path):
    sources, stream = tree
    m = _prepare(sources, tmp_path / "c", val_fraction=0.25)
    n_train = int(len(stream) * 0.75)
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert train["n_bytes"] + train["n_bytes_dropped"] == n_train
    assert val["n_bytes"] + val["n_bytes_dropped"] == len(stream) - n_train
    assert train["n_bytes_dropped"] == n_train % WB
    assert val["n_bytes_dropped"] == (len(stream) - n_train) % WB
    assert train["n_windows"] == n_train // WB


def test_shards_are_fixed_size_binary_and_bounded(tree, tmp_path):
    sources, _ = tree
    m = _prepare(sources, tmp_path / "c", shard_windows=7)
    shards = m["splits"]["train"]["shards"]
    assert [s["file"] for s in shards] == [f"train-{i:05d}.parquet" for i in range(len(shards))]
    for shard in shards:
        table = pq.read_table(tmp_path / "c" / shard["file"])
        assert table.schema.field("window").type == pa.binary(WB)
        assert 1 <= table.num_rows == shard["n_windows"] <= 7


def test_manifest_sha256_and_sizes_match_files(tree, tmp_path):
    import hashlib
    sources, _ = tree
    m = _prepare(sources, tmp_path / "c", shard_windows=10)
    for split in ("train", "val"):
        for shard in m["splits"][split]["shards"]:
            data = (tmp_path / "c" / shard["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
            assert len(data) == shard["n_bytes"]


def test_verify_detects_corrupted_shard(tree, tmp_path):
    sources, _ = tree
    m = _prepare(sources, tmp_path / "c", shard_windows=10)
    name = m["splits"]["train"]["shards"][1]["file"]
    path = tmp_path / "c" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=name):
        Corpus.open(tmp_path / "c", verify=True)


def test_missing_manifest_mentions_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="bitlm prepare"):
        ByteWindows.open(tmp_path)


def _brute_marginals(windows: np.ndarray, parity: bool) -> np.ndarray:
    bits = np.unpackbits(windows.reshape(-1)).reshape(-1, 8).astype(np.int64)
    if parity:
        bits = np.hstack([bits, bits.sum(axis=1, keepdims=True) % 2])
    return (bits.sum(axis=0) + 1) / (bits.shape[0] + 2)


@pytest.mark.parametrize("parity,width", [(True, 9), (False, 8)])
def test_phase_marginals_match_bit_expansion(tree, tmp_path, parity, width):
    sources, stream = tree
    _prepare(sources, tmp_path / "c")
    corpus = Corpus.open(tmp_path / "c")
    expected = _brute_marginals(corpus.train.to_numpy(), parity)
    got = corpus.phase_marginals(parity)
    assert got.shape == (width,)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-15)
    in_memory = Corpus.from_bytes(stream, window_bytes=WB, val_fraction=0.1)
    np.testing.assert_array_equal(in_memory.phase_marginals(parity), got)


def test_from_bytes_matches_prepared_split(tree, tmp_path):
    sources, stream = tree
    _prepare(sources, tmp_path / "c", val_fraction=0.2)
    on_disk = Corpus.open(tmp_path / "c")
    in_memory = Corpus.from_bytes(stream, window_bytes=WB, val_fraction=0.2)
    np.testing.assert_array_equal(in_memory.train.to_numpy(), on_disk.train.to_numpy())
    np.testing.assert_array_equal(in_memory.val.to_numpy(), on_disk.val.to_numpy())
    assert in_memory.manifest["splits"] == {
        name: {**entry, "shards": []} for name, entry in on_disk.manifest["splits"].items()}


def _random_windows(n: int = 20, wb: int = WB) -> ByteWindows:
    data = np.random.default_rng(1).integers(0, 256, n * wb + 5, dtype=np.uint8).tobytes()
    return ByteWindows.from_bytes(data, wb)


def test_random_batches_shape_and_crops_come_from_windows():
    windows = _random_windows()
    crops = {bytes(c) for w in windows.to_numpy() for c in np.lib.stride_tricks.sliding_window_view(w, 16)}
    batch = next(windows.random_batches(8, 16, seed=3))
    assert batch.shape == (8, 16) and batch.dtype == torch.uint8
    assert all(bytes(row.numpy()) in crops for row in batch)


def test_batches_do_not_depend_on_shard_layout(tree, tmp_path):
    sources, _ = tree
    _prepare(sources, tmp_path / "c", shard_windows=3)
    sharded = Corpus.open(tmp_path / "c").train
    whole = ByteWindows.from_bytes(sharded.to_numpy().tobytes(), WB)
    pairs = zip(range(10), sharded.random_batches(16, 24, seed=5), whole.random_batches(16, 24, seed=5))
    assert all(torch.equal(a, b) for _, a, b in pairs)
    assert torch.equal(torch.cat(list(sharded.sequential_batches(7, 24))),
                       torch.cat(list(whole.sequential_batches(7, 24))))


def test_random_batches_deterministic_per_seed_and_step():
    windows = _random_windows()
    a = [b.clone() for _, b in zip(range(5), windows.random_batches(4, 16, seed=7))]
    b = [b.clone() for _, b in zip(range(5), windows.random_batches(4, 16, seed=7))]
    c = next(windows.random_batches(4, 16, seed=8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c)
    assert not torch.equal(a[0], a[1])


def test_random_batches_start_step_resumes_exactly():
    windows = _random_windows()
    from_zero = [b.clone() for _, b in zip(range(6), windows.random_batches(4, 16, seed=7))]
    resumed = next(windows.random_batches(4, 16, seed=7, start_step=4))
    assert torch.equal(resumed, from_zero[4])


def test_random_batches_ranks_draw_disjoint_windows():
    n, wb, world = 12, 32, 3
    # Window i is filled with byte i, so every crop names the window it came from.
    windows = ByteWindows.from_bytes(np.repeat(np.arange(n, dtype=np.uint8), wb).tobytes(), wb)
    seen = []
    for rank in range(world):
        it = windows.random_batches(16, 8, seed=0, rank=rank, world_size=world)
        ids = {int(v) for _, b in zip(range(20), it) for v in b[:, 0]}
        assert all(i % world == rank for i in ids)
        seen.append(ids)
    assert set().union(*seen) == set(range(n))


@pytest.mark.parametrize("kwargs,name", [
    (dict(batch_size=0, context_bytes=16), "batch_size"),
    (dict(batch_size=2, context_bytes=1), "context_bytes"),
    (dict(batch_size=2, context_bytes=WB + 1), "context_bytes"),
    (dict(batch_size=2, context_bytes=16, world_size=21), "world_size"),
    (dict(batch_size=2, context_bytes=16, world_size=2, rank=2), "rank"),
    (dict(batch_size=2, context_bytes=16, start_step=-1), "start_step"),
])
def test_random_batches_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        _random_windows(20).random_batches(seed=0, **kwargs)


def test_sequential_batches_cover_every_crop_once_in_order():
    windows = _random_windows(n=7)
    ctx = 20  # 3 crops per 64-byte window, 4 bytes of each window unused
    batches = list(windows.sequential_batches(5, ctx))
    expected = windows.to_numpy()[:, :3 * ctx].reshape(-1, ctx)
    assert [len(b) for b in batches] == [5, 5, 5, 5, 1]
    np.testing.assert_array_equal(torch.cat(batches).numpy(), expected)
    assert len(list(windows.sequential_batches(5, ctx, max_batches=2))) == 2


def test_default_sources_read_the_stdlib(tmp_path):
    m = prepare_corpus(None, tmp_path / "std", window_bytes=256, max_bytes=200_000, progress=False)
    assert m["sources"] == [sysconfig.get_paths()["stdlib"]]
    assert m["n_bytes_total"] == 200_000
    assert m["n_files"] >= 1
    corpus = Corpus.open(tmp_path / "std", verify=True)
    assert corpus.train.n_windows == int(200_000 * 0.9) // 256
    text = corpus.train.to_numpy().tobytes()
    assert b"def " in text or b"import " in text


def test_val_may_be_empty_only_without_val_fraction(tmp_path):
    corpus = Corpus.from_bytes(bytes(range(256)) * 2, window_bytes=128, val_fraction=0.0)
    assert corpus.train.n_windows == 4 and corpus.val.n_windows == 0
    with pytest.raises(ValueError, match="too small"):
        Corpus.from_bytes(bytes(range(256)) * 2, window_bytes=128, val_fraction=0.1)


def test_corpus_too_small_for_window(tmp_path):
    _write(tmp_path / "tiny.txt", b"abc")
    with pytest.raises(ValueError, match="window_bytes=64"):
        prepare_corpus([str(tmp_path / "tiny.txt")], tmp_path / "out", window_bytes=64, progress=False)


@pytest.mark.parametrize("kwargs,name", [
    (dict(window_bytes=1), "window_bytes"),
    (dict(val_fraction=1.0), "val_fraction"),
    (dict(val_fraction=-0.1), "val_fraction"),
    (dict(shard_windows=0), "shard_windows"),
    (dict(max_bytes=0), "max_bytes"),
])
def test_prepare_rejects_bad_arguments(tree, tmp_path, kwargs, name):
    sources, _ = tree
    with pytest.raises(ValueError, match=name):
        _prepare(sources, tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()


def test_prepare_rejects_missing_source(tmp_path):
    missing = str(tmp_path / "nope" / "*.txt")
    with pytest.raises(ValueError, match="sources.*nope"):
        prepare_corpus([missing], tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="sources"):
        prepare_corpus([str(tmp_path / "absent.txt")], tmp_path / "out", progress=False)


def test_split_windows_keeps_nanogpt_boundary():
    stream = np.arange(1000, dtype=np.int64).astype(np.uint8)
    splits = split_windows(stream, 10, 0.1)
    train, dropped = splits["train"]
    assert train.shape == (90, 10) and dropped == 0
    np.testing.assert_array_equal(splits["val"][0].reshape(-1), stream[900:])
