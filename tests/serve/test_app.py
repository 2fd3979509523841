"""The Serve application over real HTTP on 127.0.0.1: endpoints, gate, batching, auth, limits and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import requests
import pytest
import torch

from bitlm.checkpoint import read_config
from bitlm.sampling import generate
from serve.model_sources import SourceError, resolve_source

PASS = {"c_floor": 0.0, "s_floor": 0.0}  # floors nothing breaks
BLOCK = {"c_floor": 1.0, "s_floor": 1.0}  # floors everything breaks (see REFERENCE in conftest)


def _audit_lines(server) -> list[dict]:
    return [json.loads(line) for line in server.audit_log.read_text().splitlines()] if server.audit_log.exists() else []


def _post(server, path: str, body, *, url: str | None = None) -> requests.Response:
    with server.client() as client:
        if isinstance(body, (bytes, str)):
            return client.post(f"{url or server.url}{path}", data=body, timeout=120,
                               headers={"Content-Type": "application/json"})
        return client.post(f"{url or server.url}{path}", json=body, timeout=120)


# --- endpoints -------------------------------------------------------------------------------------------


def test_generate_causal_returns_text_bits_telemetry_and_gate(server):
    r = _post(server, "/v1/generate", {"prompt": "The ", "max_new_bytes": 8, "seed": 3, **PASS})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["text"].startswith("The ") and out["n_bits"] == 8 * 9
    assert out["gate"]["passed"] is True and len(out["gate"]["attempts"]) == 1
    assert out["gate"]["attempts"][0]["seed"] == 3 and "text" not in out["gate"]
    assert set(out["telemetry"]) == {"K", "C", "S"} and set(out["timings"]) == {"queue_ms", "generate_ms", "total_ms"}
    assert out["model"] == str(server.causal_dir)


def test_generate_causal_equals_local_sampling_with_the_same_seed(server):
    from bitlm.checkpoint import from_pretrained

    model = from_pretrained(server.causal_dir)
    r = _post(server, "/v1/generate", {"prompt": "abc", "max_new_bytes": 6, "seed": 11, "temperature": 0.7, **PASS})
    assert r.json()["text"] == generate(model, "abc", 6, temperature=0.7, seed=11).text


def test_sampling_unit_bit_is_the_flat_models_default(server):
    body = {"prompt": "abc", "max_new_bytes": 6, "seed": 11, **PASS}
    assert _post(server, "/v1/generate", body | {"sampling_unit": "bit"}).json()["text"] == \
        _post(server, "/v1/generate", body).json()["text"]


def test_generate_diffusion_fills_the_continuation(server):
    r = _post(server, "/v1/generate", {"prompt": "ab", "max_new_bytes": 6, "mode": "diffusion", "diffusion_steps": 4,
                                       "schedule": "linear", "seed": 1, **PASS}, url=server.diffusion_url)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["text"].startswith("ab") and out["n_bits"] == 6 * 9
    assert out["gate"]["attempts"][0]["mode"] == "diffusion"


def test_unset_max_new_bytes_shrinks_to_the_server_limit(server):
    r = _post(server, "/v1/generate", {"prompt": "ab", "seed": 0, **PASS})
    assert r.status_code == 200 and r.json()["n_bits"] == server.limits["max_new_bytes"] * 9


@pytest.mark.parametrize("near_zero", [{"temperature": 5e-324}, {"temperature": 1e-40}, {"top_p": 5e-324},
                                       {"top_p": 1e-300, "top_k": 1}])
def test_temperature_or_top_p_near_zero_samples_greedily(server, near_zero):
    greedy = _post(server, "/v1/generate", {"prompt": "ab", "max_new_bytes": 3, "temperature": 1e-30, **PASS})
    for url, mode in ((server.url, "causal"), (server.diffusion_url, "diffusion")):
        r = _post(server, "/v1/generate", {"prompt": "ab", "max_new_bytes": 3, "mode": mode, **near_zero, **PASS},
                  url=url)
        assert r.status_code == 200, r.text
    if "temperature" in near_zero:
        assert _post(server, "/v1/generate", {"prompt": "ab", "max_new_bytes": 3, **near_zero, **PASS}).json()["text"] \
            == greedy.json()["text"]


def test_generate_mode_must_match_the_model(server):
    r = _post(server, "/v1/generate", {"prompt": "ab", "mode": "diffusion"})
    assert r.status_code == 422 and r.json()["detail"].startswith("mode:")
    r = _post(server, "/v1/generate", {"prompt": "ab"}, url=server.diffusion_url)
    assert r.status_code == 422 and r.json()["detail"].startswith("mode:")


def test_score_returns_bpb_and_telemetry(server):
    r = _post(server, "/v1/score", {"text": "hello world, hello world"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["bound"] == "exact" and out["n_bytes"] == 23 and out["bpb"] > 0
    assert set(out["telemetry"]) == {"K", "C", "S"}
    r = _post(server, "/v1/score", {"text": "hello world, hello world"}, url=server.diffusion_url)
    assert r.status_code == 200 and r.json()["bound"] == "elbo"


def test_model_reports_config_parameters_source_and_reference(server):
    with server.client() as client:
        out = client.get(f"{server.url}/v1/model").json()
    assert out["config"] == json.loads((server.causal_dir / "config.json").read_text())["model"]
    assert out["n_parameters"] > 0 and out["source"] == str(server.causal_dir)
    assert out["telemetry_reference"] == pytest.approx([0.2] * 8 + [0.5])
    assert read_config(server.causal_dir).causal


def test_healthz_and_openapi_are_open(server):
    assert requests.get(f"{server.url}/healthz").json() == {"status": "ok"}
    spec = requests.get(f"{server.url}/openapi.json").json()
    assert {"/v1/generate", "/v1/score", "/v1/model", "/healthz"} <= set(spec["paths"])
    assert requests.get(f"{server.url}/docs").status_code == 200


def test_index_names_the_missing_page_or_serves_it(server):
    from serve.app import STATIC_INDEX

    r = requests.get(f"{server.url}/")
    if STATIC_INDEX.is_file():
        assert r.status_code == 200 and "html" in r.headers["content-type"]
    else:
        assert r.status_code == 404 and "index.html" in r.json()["detail"]


# --- batching --------------------------------------------------------------------------------------------


def test_concurrent_requests_each_get_their_own_seeded_result(server):
    def one(seed: int) -> dict:
        return _post(server, "/v1/generate", {"prompt": "Hi ", "max_new_bytes": 6, "seed": seed, **PASS}).json()

    before = len(_audit_lines(server))
    with ThreadPoolExecutor(8) as pool:
        batched = list(pool.map(one, range(100, 108)))
    alone = [one(seed) for seed in (100, 105)]
    lines = _audit_lines(server)[before:]
    assert len(lines) == 10 and {line["request_id"] for line in lines} == {b["request_id"] for b in batched + alone}
    assert [b["gate"]["attempts"][0]["seed"] for b in batched] == list(range(100, 108))
    assert [batched[0]["text"], batched[5]["text"]] == [a["text"] for a in alone]
    assert len({b["text"] for b in batched}) > 1
    # the server names each request's batch: 8 concurrent callers in fewer than 8 batches, each batch's
    # size the number of callers that report its id; requests sent one at a time are batches of one
    ids = [b["batch"]["id"] for b in batched]
    assert len(set(ids)) < 8
    assert all(b["batch"]["size"] == ids.count(b["batch"]["id"]) for b in batched)
    assert [a["batch"]["size"] for a in alone] == [1, 1] and not {a["batch"]["id"] for a in alone} & set(ids)


# --- safety gate and audit log ---------------------------------------------------------------------------


def test_blocked_non_strict_is_200_without_text_after_every_retry(server):
    r = _post(server, "/v1/generate", {"prompt": "ab", "max_new_bytes": 4, "seed": 5, "max_retries": 2, **BLOCK})
    assert r.status_code == 200
    out = r.json()
    assert out["text"] is None and out["gate"]["passed"] is False and out["gate"]["reasons"]
    assert [a["seed"] for a in out["gate"]["attempts"]] == [5, 6, 7]


def test_blocked_strict_is_422_with_the_verdict(server):
    r = _post(server, "/v1/generate", {"prompt": "ab", "max_new_bytes": 4, "max_retries": 0, "strict": True, **BLOCK})
    assert r.status_code == 422
    out = r.json()
    assert "blocked" in out["detail"] and out["gate"]["passed"] is False and len(out["gate"]["attempts"]) == 1
    assert out["gate"]["c_floor"] == 1.0 and "text" not in out["gate"]


def test_audit_log_has_one_line_per_verdict(server):
    before = len(_audit_lines(server))
    for body in ({"prompt": "x", "max_new_bytes": 2, **PASS}, {"prompt": "y", "max_new_bytes": 2, **BLOCK},
                 {"prompt": "z", "max_new_bytes": 2, "strict": True, "max_retries": 0, **BLOCK}):
        _post(server, "/v1/generate", body)
    _post(server, "/v1/generate", {"prompt": ""})  # rejected before the gate: no verdict, no line
    lines = _audit_lines(server)[before:]
    assert [line["verdict"]["passed"] for line in lines] == [True, False, False]
    assert all(line["request_id"] and line["ts"] for line in lines)
    assert len({line["request_id"] for line in lines}) == 3


def test_audit_log_appends_whole_lines_from_many_threads(tmp_path):
    from serve.audit import AuditLog

    log = AuditLog(tmp_path / "audit.jsonl")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: log.record(f"r{i}", {"passed": i % 2 == 0, "text": "line\nbreak" * 50}), range(400)))
    records = log.read()
    assert sorted(r["request_id"] for r in records) == sorted(f"r{i}" for i in range(400))


# --- auth ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_v1_needs_the_bearer_token(server, token):
    with server.client(token=token) as client:
        assert client.get(f"{server.url}/v1/model").status_code == 401
        r = client.post(f"{server.url}/v1/generate", json={"prompt": "a"})
        assert r.status_code == 401 and "authorization" in r.json()["detail"]


def test_right_token_passes_and_healthz_stays_open(server):
    with server.client() as client:
        assert client.get(f"{server.url}/v1/model").status_code == 200
    assert requests.get(f"{server.url}/healthz").status_code == 200


# --- limits and bad input --------------------------------------------------------------------------------


def test_prompt_over_the_byte_limit_is_422_naming_field_and_limit(server):
    r = _post(server, "/v1/generate", {"prompt": "é" * 33})  # 66 bytes, 33 characters
    assert r.status_code == 422 and r.json()["detail"].startswith("prompt:") and "64" in r.json()["detail"]


def test_max_new_bytes_over_the_limit_is_422(server):
    r = _post(server, "/v1/generate", {"prompt": "a", "max_new_bytes": 33})
    assert r.status_code == 422 and r.json()["detail"].startswith("max_new_bytes:") and "32" in r.json()["detail"]


def test_score_text_over_the_limit_is_422(server):
    r = _post(server, "/v1/score", {"text": "a" * 2049})
    assert r.status_code == 422 and r.json()["detail"].startswith("text:") and "2048" in r.json()["detail"]


def test_body_over_the_limit_is_413(server):
    r = _post(server, "/v1/generate", json.dumps({"prompt": "a", "pad": "x" * 5000}))
    assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"] and "4096" in r.json()["detail"]


def test_batch_size_limit_is_a_validated_argument():
    from serve.schemas import AppArgs

    with pytest.raises(ValueError, match="max_batch_size"):
        AppArgs(model="m", max_batch_size=0)


BAD_BODIES = [
    ('{"prompt": "a", ', "body"),
    ('["a"]', "body"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "a", "max_new_bytes": "many"}, "max_new_bytes"),
    ('{"prompt": "a", "temperature": NaN}', "temperature"),
    ({"prompt": "a", "temperature": -1.0}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "top_p": 1.5}, "top_p"),
    ({"prompt": "a", "mode": "telepathy"}, "mode"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "a", "top_k": 0}, "top_k"),
    ({"prompt": "a", "sampling_unit": "word"}, "sampling_unit"),
    ({"prompt": "a", "sampling_unit": "byte"}, "sampling_unit"),  # the served causal model is the flat bit model
    ({"prompt": "a", "diffusion_steps": 65}, "diffusion_steps"),
    ({"prompt": "a", "schedule": "sqrt"}, "schedule"),
    ({"prompt": "a", "c_floor": 2}, "c_floor"),
    ({"prompt": "a", "max_retries": 6}, "max_retries"),
    ({"prompt": "a", "seed": -1}, "seed"),
    ({"prompt": "a", "strict": "maybe"}, "strict"),
    ({"prompt": "a", "colour": "red"}, "colour"),
    ('{"prompt": "\\udc80"}', "prompt"),  # valid JSON, but a lone surrogate is no UTF-8 text
    (b'{"prompt": "ab\xff\xfe"}', "prompt"),  # raw invalid UTF-8 bytes
    (b'{"prompt": "a"\xff}', "body"),
    ({"prompt": "a", "max_new_bytes": True}, "max_new_bytes"),
    ({"prompt": "a", "max_new_bytes": "8"}, "max_new_bytes"),
    ('{"prompt": ' + "[" * 20000 + "]" * 20000 + "}", "body"),  # nested past the JSON parser's recursion limit
]


@pytest.mark.parametrize("body,field", BAD_BODIES, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_BODIES)])
def test_bad_input_is_4xx_naming_the_field(server, body, field):
    r = _post(server, "/v1/generate", body)
    assert 400 <= r.status_code < 500, r.text
    assert field in r.json()["detail"]


def test_bad_score_input_is_422_naming_the_field(server):
    for body in ({"text": "a"}, {"text": 3}, {}):
        r = _post(server, "/v1/score", body)
        assert r.status_code == 422 and "text" in r.json()["detail"]


# --- model sources ---------------------------------------------------------------------------------------


def test_source_resolves_a_run_directory_to_its_newest_checkpoint(model_dirs, tmp_path):
    import shutil

    for step in (10, 200):
        shutil.copytree(model_dirs[0], tmp_path / "run" / "checkpoints" / f"step-{step:08d}")
    assert resolve_source(str(tmp_path / "run"), [tmp_path]) == (tmp_path / "run/checkpoints/step-00000200").resolve()


def test_source_refuses_dot_dot_traversal_out_of_the_roots(model_dirs, tmp_path):
    inside = tmp_path / "root"
    inside.mkdir()
    with pytest.raises(SourceError, match="outside the allowed roots"):
        resolve_source(str(inside / ".." / ".." / model_dirs[0].parent.name / "causal"), [inside])


def test_source_refuses_a_symlink_that_leaves_the_roots(model_dirs, tmp_path):
    (tmp_path / "link").symlink_to(model_dirs[0], target_is_directory=True)
    with pytest.raises(SourceError, match="outside the allowed roots"):
        resolve_source(str(tmp_path / "link"), [tmp_path])
    os.symlink(model_dirs[0] / "model.safetensors", tmp_path / "model.safetensors")  # one file pointing out
    (tmp_path / "config.json").write_text((model_dirs[0] / "config.json").read_text())
    with pytest.raises(SourceError, match="outside the allowed roots"):
        resolve_source(str(tmp_path), [tmp_path])


def test_source_refuses_pickled_weights(model_dirs, tmp_path):
    (tmp_path / "config.json").write_text((model_dirs[0] / "config.json").read_text())
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(SourceError, match="pickled weights"):
        resolve_source(str(tmp_path), [tmp_path])


def test_source_downloads_a_registered_mlflow_model_by_alias(model_dirs, tmp_path, monkeypatch):
    import mlflow

    from pipelines.tracking import RunTracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("BITLM_SERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # the run's artifacts go to ./mlruns
    try:
        with RunTracker.start("serve-tests", "run", {}, system_metrics=False) as tracker:
            tracker.log_model(model_dirs[0], registered_name="bitlm-serve", alias="live")
        local = resolve_source("models:/bitlm-serve@live", [tmp_path / "elsewhere"])
        again = resolve_source("models:/bitlm-serve@live", [tmp_path / "elsewhere"])  # a server restart
    finally:
        mlflow.set_tracking_uri(None)
    assert local.is_relative_to((tmp_path / "cache").resolve())
    assert (local / "model.safetensors").read_bytes() == (model_dirs[0] / "model.safetensors").read_bytes()
    # one copy per model, not one per start
    assert again == local and len(list((tmp_path / "cache").iterdir())) == 1


def test_build_app_refuses_a_source_outside_the_roots(tmp_path):
    from serve.app import build_app

    with pytest.raises(SourceError):
        build_app({"model": "/etc", "allowed_roots": [str(tmp_path)]})


def test_serve_config_binds_loopback_and_its_args_validate():
    import yaml

    from serve.schemas import AppArgs

    config = yaml.safe_load((Path(__file__).parents[2] / "serve" / "serve_config.yaml").read_text())
    assert config["http_options"]["host"] == "127.0.0.1"
    app = config["applications"][0]
    assert app["import_path"] == "serve.app:build_app"
    assert AppArgs.model_validate(app["args"]).max_batch_size == 8


# --- CLI -------------------------------------------------------------------------------------------------


def test_bitlm_serve_refuses_a_model_outside_the_roots_before_starting_ray(tmp_path):
    from click.testing import CliRunner

    from bitlm.cli import main

    result = CliRunner().invoke(main, ["serve", "--model", "/etc", "--allowed-root", str(tmp_path)])
    assert result.exit_code == 2 and "outside the allowed roots" in result.output


def test_bitlm_serve_help_lists_its_options():
    from click.testing import CliRunner

    from bitlm.cli import main

    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--model", "--port", "--host", "--replicas", "--address"):
        assert option in result.output


def test_the_token_never_reaches_the_deployment_config_only_its_digest(model_dirs, tmp_path):
    from serve.app import build_app, token_digest

    causal_dir, secret = model_dirs[0], "not-for-the-config-store-91c2"
    app = build_app({"model": str(causal_dir), "allowed_roots": [str(causal_dir.parent)], "api_token": secret,
                     "audit_log": str(tmp_path / "audit.jsonl")})
    # what Ray stores and the dashboard shows: the deployment's init args
    stored = json.dumps(app._bound_deployment.init_args, default=str)
    assert secret not in stored and token_digest(secret) in stored
