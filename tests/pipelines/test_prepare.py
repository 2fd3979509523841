"""pipelines.prepare: the Ray-read corpus is the corpus `bitlm prepare` writes, shard for shard."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bitlm.data import Corpus, prepare_corpus
from pipelines.prepare import main, prepare_driver

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"
WB = 64


@pytest.fixture
def tree(tmp_path):
    """Generated text files of different sizes, nested two deep, plus one the include patterns skip."""
    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz  \n.,", dtype=np.uint8)

    def write(rel: str, n: int) -> None:
        path = tmp_path / "src" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.choice(letters, n).tobytes())

    for rel, n in [("a.txt", 1500), ("b.md", 3), ("empty.py", 0), ("sub/c.py", 2700),
                   ("sub/deep/d.rst", 911), ("sub/deep/e.txt", 64), ("z.txt", 1234)]:
        write(rel, n)
    write("sub/skipped.bin", 500)
    return [str(tmp_path / "src")]


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.parquet"))}


def _assert_same_corpus(sources, tmp_path: Path, **options) -> dict:
    """Prepare sources both ways and check manifests and shard bytes agree; returns the manifest."""
    single, ray_dir = tmp_path / "single", tmp_path / "ray"
    task_bytes = options.pop("task_bytes", 1 << 20)
    expected = prepare_corpus(sources, single, progress=False, **options)
    got = prepare_driver(sources, ray_dir, task_bytes=task_bytes, progress=False, **options)
    # No field differs: sources are recorded as given and n_files, sizes, sha256s and marginals
    # are all functions of the bytes read, which both paths take from one shared plan.
    assert got == expected
    assert json.loads((ray_dir / "manifest.json").read_text()) == json.loads((single / "manifest.json").read_text())
    assert _digests(ray_dir) == _digests(single)
    assert len(_digests(ray_dir)) == sum(len(s["shards"]) for s in got["splits"].values())
    return got


@pytest.mark.parametrize("task_bytes", [97, 1 << 20])
def test_matches_prepare_corpus_on_a_tree(ray_local, tree, tmp_path, task_bytes):
    # 97-byte spans cut files and separators mid-way and may land in any order; 1 MiB is one task.
    manifest = _assert_same_corpus(tree, tmp_path, window_bytes=WB, shard_windows=7, task_bytes=task_bytes)
    assert manifest["n_files"] == 7
    assert len(manifest["splits"]["train"]["shards"]) > 1


@pytest.mark.parametrize("max_bytes", [1000, 1501, 1502, 4444])
def test_max_bytes_matches_prepare_corpus(ray_local, tree, tmp_path, max_bytes):
    # a.txt is 1500 bytes: 1501 ends on the separator after it (b.md counts as read, with 0 bytes),
    # 1502 takes one byte of b.md, 1000 cuts inside the first file, 4444 inside the fifth (d.rst).
    manifest = _assert_same_corpus(tree, tmp_path, window_bytes=WB, val_fraction=0.2, shard_windows=5,
                                   max_bytes=max_bytes, task_bytes=300)
    assert manifest["n_bytes_total"] == max_bytes
    assert manifest["n_files"] == {1000: 1, 1501: 2, 1502: 2, 4444: 5}[max_bytes]


def test_matches_prepare_corpus_on_tinyshakespeare(ray_local, tmp_path):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"tinyshakespeare not found at ../shared/data (looked for {SHAKESPEARE.name})")
    manifest = _assert_same_corpus([str(SHAKESPEARE)], tmp_path, window_bytes=256, shard_windows=1000,
                                   task_bytes=128 << 10)
    assert manifest["n_bytes_total"] == SHAKESPEARE.stat().st_size


def test_output_opens_verified_and_holds_the_stream(ray_local, tree, tmp_path):
    prepare_driver(tree, tmp_path / "ray", window_bytes=WB, shard_windows=4, task_bytes=500, progress=False)
    corpus = Corpus.open(tmp_path / "ray", verify=True)
    files = sorted(p for p in Path(tree[0]).rglob("*") if p.is_file() and p.suffix != ".bin")
    stream = b"\n".join(p.read_bytes() for p in sorted(files, key=str))
    assert corpus.train.to_numpy().tobytes() == stream[:corpus.train.n_bytes]


def test_rebuild_replaces_stale_shards(ray_local, tree, tmp_path):
    prepare_driver(tree, tmp_path / "ray", window_bytes=WB, shard_windows=2, progress=False)
    manifest = prepare_driver(tree, tmp_path / "ray", window_bytes=WB, shard_windows=50, progress=False)
    listed = {s["file"] for split in manifest["splits"].values() for s in split["shards"]}
    assert set(_digests(tmp_path / "ray")) == listed


@pytest.mark.parametrize("kwargs,name", [
    (dict(window_bytes=1), "window_bytes"),
    (dict(val_fraction=1.0), "val_fraction"),
    (dict(val_fraction=-0.1), "val_fraction"),
    (dict(shard_windows=0), "shard_windows"),
    (dict(max_bytes=0), "max_bytes"),
    (dict(task_bytes=0), "task_bytes"),
    (dict(num_cpus_per_task=0), "num_cpus_per_task"),
])
def test_rejects_bad_options_before_reading(tree, tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        prepare_driver(tree, tmp_path / "bad", progress=False, **kwargs)
    assert not (tmp_path / "bad").exists()


def test_too_small_corpus_fails_as_prepare_corpus_does(ray_local, tmp_path):
    (tmp_path / "tiny.txt").write_bytes(b"abc")
    sources = [str(tmp_path / "tiny.txt")]
    with pytest.raises(ValueError, match="window_bytes=64") as single:
        prepare_corpus(sources, tmp_path / "a", window_bytes=64, progress=False)
    with pytest.raises(ValueError, match="window_bytes=64") as ray_err:
        prepare_driver(sources, tmp_path / "b", window_bytes=64, progress=False)
    assert str(ray_err.value) == str(single.value)


def test_missing_source_names_it(ray_local, tmp_path):
    with pytest.raises(ValueError, match="sources.*nope"):
        prepare_driver([str(tmp_path / "nope" / "*.txt")], tmp_path / "out", progress=False)


def test_cli_writes_the_corpus_of_bitlm_prepare(ray_local, tree, tmp_path):
    expected = prepare_corpus(tree, tmp_path / "single", window_bytes=WB, shard_windows=9, max_bytes=5000,
                              progress=False)
    result = CliRunner().invoke(main, [*tree, "--out", str(tmp_path / "ray"), "--window-bytes", str(WB),
                                       "--shard-windows", "9", "--max-bytes", "5000", "--task-bytes", "700",
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    assert "prepared 5 file(s), 5,000 bytes" in result.output
    assert json.loads((tmp_path / "ray" / "manifest.json").read_text()) == expected
    assert _digests(tmp_path / "ray") == _digests(tmp_path / "single")
    assert ray_local.is_initialized()  # the CLI leaves a session it did not start alone


def test_cli_reports_bad_option_by_name(ray_local, tree, tmp_path):
    result = CliRunner().invoke(main, [*tree, "--out", str(tmp_path / "bad"), "--task-bytes", "0"])
    assert result.exit_code == 2
    assert "task_bytes" in result.output
