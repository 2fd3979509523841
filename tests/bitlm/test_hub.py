"""Hub push/pull against a loopback fake Hub on 127.0.0.1, driven by the real huggingface_hub client.

The client runs in subprocesses: HF_ENDPOINT and HF_HUB_OFFLINE are read when huggingface_hub is
imported. Not exercised: the real Hub (its LFS/Xet upload paths, rate limits, gated repositories).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitlm.checkpoint import from_pretrained, save_pretrained
from bitlm.config import ModelConfig
from bitlm.hub import HubError, check_repo_id, model_card
from bitlm.model import BitTransformerLM
from bitlm.quantization import quantize_int4

from fake_hub import FakeHub

TOKEN = "hf_test_S3cr3tT0ken_9b1e"
pytest.importorskip("torchao")


def _client(hub: FakeHub, home: Path, code: str, *, offline: bool = False) -> tuple[dict, str]:
    """Run `code` (which sets `result`) with the client pointed at the fake Hub; returns (result, all output)."""
    env = os.environ | {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN, "HF_HOME": str(home / "hf"),
                        "HF_HUB_VERBOSITY": "debug", "HF_HUB_DISABLE_TELEMETRY": "1",
                        "HF_HUB_OFFLINE": "1" if offline else "0"}
    script = ("import json, logging\nlogging.basicConfig(level=logging.DEBUG)\nresult = {}\n" + code +
              "\nprint('RESULT ' + json.dumps(result))\n")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    line = [entry for entry in done.stdout.splitlines() if entry.startswith("RESULT ")][-1]
    return json.loads(line.removeprefix("RESULT ")), output


def _errors(calls: dict[str, str]) -> str:
    """Client code that records the one-line HubError message of each call."""
    lines = ["from bitlm.hub import HubError, download, push_to_hub"]
    for name, call in calls.items():
        lines += ["try:", f"    {call}", f"    result[{name!r}] = 'no error'",
                  "except HubError as err:", f"    result[{name!r}] = str(err)"]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def hub_session(tmp_path_factory):
    """Push an fp32 and a 4-bit model from a run directory, pull them, then pull again offline."""
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    model = BitTransformerLM(ModelConfig.from_name("tiny", kind="patched"))
    run = root / "run"
    fp32 = save_pretrained(model, run / "model")
    int4 = save_pretrained(quantize_int4(model), root / "int4")
    (run / ".bitlm-run").write_text(json.dumps({"format": "bitlm-run/1", "corpus": "c0ffee" * 10}))
    (run / "config.json").write_text(json.dumps({"train": {"max_steps": 20, "batch_size": 8, "context_bytes": 64,
                                                           "lr": 0.01, "schedule": "cosine", "qat": True}}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 20, "val/bpb": 4.25}) + "\n")
    with FakeHub(TOKEN) as hub:
        pushed, push_log = _client(hub, root, f"""
from bitlm.hub import push_to_hub, download
result["fp32"] = push_to_hub({str(fp32)!r}, "user/tiny-patched", measured={{"this model": 4.3, "gzip -9": 3.1}})
result["int4"] = push_to_hub({str(int4)!r}, "user/tiny-int4", private=False)
result["fp32_dir"] = str(download("user/tiny-patched"))
result["int4_dir"] = str(download("user/tiny-int4"))
""")
        n_online = len(hub.requests)
        offline, offline_log = _client(hub, root, """
from bitlm.hub import download
result["fp32_dir"] = str(download("user/tiny-patched"))
result["int4_dir"] = str(download("user/tiny-int4"))
from serve.model_sources import resolve_source
result["served"] = str(resolve_source("hf://user/tiny-int4", allowed_roots=["/nonexistent"]))
""" + _errors({"never_pulled": "download('user/never-pulled')"}), offline=True)
        n_offline = len(hub.requests) - n_online
        hub.repos["user/card-only"] = type(hub.repos["user/tiny-int4"])(private=False)
        hub.commit(hub.repos["user/card-only"], {"README.md": b"# nothing here"})
        hub.commit(hub.repos.setdefault("user/tampered", type(hub.repos["user/tiny-int4"])(private=False)),
                   dict(hub.repos["user/tiny-int4"].files))
        weights = hub.repos["user/tampered"].files["model.safetensors"]
        hub.tampered[("user/tampered", "model.safetensors")] = weights[:-1] + bytes([weights[-1] ^ 1])
        errors, errors_log = _client(hub, root, _errors({
            "missing_repo": "download('user/no-such-model')",
            "missing_files": "download('user/card-only')",
            "tampered": "download('user/tampered')",
            "bad_id_pull": "download('not a repo id')",
            "bad_dir_push": f"push_to_hub({str(root)!r}, 'user/x')",
        }))
        yield {"root": root, "fp32": fp32, "int4": int4, "hub": hub, "pushed": pushed, "offline": offline,
               "errors": errors, "n_offline": n_offline, "logs": push_log + offline_log + errors_log}


def test_push_then_pull_round_trips_every_file_bit_exactly(hub_session):
    s = hub_session
    for name in ("fp32", "int4"):
        pulled = Path(s["pushed"][f"{name}_dir"])
        for file in ("config.json", "model.safetensors"):
            assert (pulled / file).read_bytes() == (s[name] / file).read_bytes()
        x = torch.randint(0, 2, (1, 72))
        assert torch.equal(from_pretrained(pulled)(x)[0], from_pretrained(s[name])(x)[0])


def test_the_pushed_files_are_those_on_the_hub(hub_session):
    repo = hub_session["hub"].repos["user/tiny-patched"]
    assert sorted(repo.files) == ["README.md", "config.json", "model.safetensors"]
    assert repo.private and not hub_session["hub"].repos["user/tiny-int4"].private


def test_an_offline_pull_loads_from_the_cache_without_a_request(hub_session):
    s = hub_session
    assert s["n_offline"] == 0
    assert s["offline"]["fp32_dir"] == s["pushed"]["fp32_dir"]
    assert "not in the local cache" in s["offline"]["never_pulled"]


def test_serve_resolves_an_hf_source_to_the_pulled_directory(hub_session):
    # `bitlm serve --model hf://user/repo` and build_app go through resolve_source; the cache is an allowed root
    assert Path(hub_session["offline"]["served"]) == Path(hub_session["pushed"]["int4_dir"]).resolve()


def test_the_token_is_sent_but_never_logged_carded_or_written(hub_session):
    s = hub_session
    assert any(had_token for _, _, had_token in s["hub"].requests)  # the client really used it
    assert TOKEN not in s["logs"]
    for repo in s["hub"].repos.values():
        assert all(TOKEN.encode() not in data for data in repo.files.values())
    assert all(TOKEN.encode() not in body for body in s["hub"].bodies)
    written = [p for p in s["root"].rglob("*") if p.is_file()]
    assert written and all(TOKEN.encode() not in p.read_bytes() for p in written)


def test_the_model_card_holds_the_measured_facts(hub_session):
    card = hub_session["hub"].repos["user/tiny-patched"].files["README.md"].decode()
    assert "c0ffee" * 10 in card and "4.2500" in card and "4-bit QAT" in card
    assert "| this model | 4.3000 |" in card and "| gzip -9 | 3.1000 |" in card
    n = sum(p.numel() for p in BitTransformerLM(ModelConfig.from_name("tiny", kind="patched")).parameters())
    assert f"{n:,} parameters" in card
    int4_card = hub_session["hub"].repos["user/tiny-int4"].files["README.md"].decode()
    assert "format: int4 (group size 32)" in int4_card and "Measured bits per byte" not in int4_card


def test_missing_repos_files_and_tampered_downloads_are_one_line_errors(hub_session):
    errors = hub_session["errors"]
    assert "no such model repository" in errors["missing_repo"]
    assert "has no config.json or model.safetensors" in errors["missing_files"]
    assert "does not match the Hub's hash" in errors["tampered"]
    assert "must be 'user/name'" in errors["bad_id_pull"]
    assert "no config.json" in errors["bad_dir_push"]
    assert all("\n" not in message for message in errors.values())


@pytest.mark.parametrize("repo_id", ["nouser", "a/b/c", "user/with space", "user/bad--name", "-user/x", "", "u/" + "x" * 97])
def test_bad_repo_ids_are_refused_before_any_request(repo_id):
    with pytest.raises(HubError, match="must be 'user/name'"):
        check_repo_id(repo_id)


def test_cli_hub_push_refuses_a_bad_repo_id_in_one_line(tmp_path):
    from click.testing import CliRunner

    from bitlm.cli import main

    directory = save_pretrained(BitTransformerLM(ModelConfig.from_name("tiny")), tmp_path / "m")
    result = CliRunner().invoke(main, ["hub", "push", str(directory), "not/a/repo"])
    assert result.exit_code == 2 and "must be 'user/name'" in result.output


def test_a_card_outside_a_run_states_only_the_directory(tmp_path):
    directory = save_pretrained(BitTransformerLM(ModelConfig.from_name("tiny", kind="byte")), tmp_path / "m")
    card = model_card(directory, "user/byte")
    assert "byte baseline" in card and "## Training" not in card and "bits per byte" not in card.lower()
