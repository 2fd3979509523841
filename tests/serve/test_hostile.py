"""Hostile clients of the HTTP API: slow bodies, a full replica, a broken audit log, unhandled errors.

One app on 127.0.0.1 with 4 request slots and a 3-second body deadline; every socket is closed
and every wait bounded (the module takes about 15 s).
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from contextlib import ExitStack

import pytest
import requests

from bitlm.checkpoint import save_pretrained
from serve.local import free_port, wait_for
from tests.serve.conftest import TOKEN, tiny_model

pytestmark = pytest.mark.timeout(120)

SLOTS = 4
BODY_TIMEOUT_S = 3.0
N_STALLED = 16  # four times the slots: the surplus is turned away at once, the rest hold a slot until the deadline


@pytest.fixture(scope="module")
def hostile(ray_local, tmp_path_factory):
    """(base url, port, audit log path) of an app with few slots and a short body deadline."""
    from ray import serve

    from serve.app import build_app

    root = tmp_path_factory.mktemp("hostile")
    model_dir = save_pretrained(tiny_model(True), root / "model")
    audit = root / "audit.jsonl"
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": str(model_dir), "allowed_roots": [str(root)], "api_token": TOKEN,
                         "audit_log": str(audit), "num_cpus": 0.5, "max_ongoing_requests": SLOTS,
                         "body_timeout_s": BODY_TIMEOUT_S}), name="hostile", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_for(f"{url}/healthz", 60)
    yield url, port, audit
    serve.shutdown()


def stalled_request(port: int, token: str | None) -> socket.socket:
    """A POST /v1/score that announces 50 bytes of body, sends one, and then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=BODY_TIMEOUT_S + 10)
    lines = ["POST /v1/score HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json",
             "Content-Length: 50"] + ([f"Authorization: Bearer {token}"] if token else [])
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n{").encode())
    return sock


def response_of(sock: socket.socket) -> tuple[int, dict]:
    """(status, JSON body) of the response on `sock` (socket.timeout if none comes in time)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    headers = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:] if ": " in line)
    length = int({k.lower(): v for k, v in headers.items()}.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split()[1]), json.loads(body) if body else {}


def test_v1_without_the_token_is_401_before_its_body_arrives(hostile):
    _, port, _ = hostile
    with stalled_request(port, token=None) as sock:
        status, body = response_of(sock)  # a server that read the body first would answer 408, or never
    assert status == 401 and body["detail"].startswith("authorization")


def test_a_body_that_stops_arriving_is_408_after_the_deadline(hostile):
    _, port, _ = hostile
    with stalled_request(port, token=TOKEN) as sock:
        status, body = response_of(sock)
    assert status == 408 and "body_timeout_s" in body["detail"] and "1 of 50 bytes" in body["detail"]


def test_healthz_answers_while_stalled_clients_hold_every_request_slot(hostile):
    url, port, _ = hostile
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with ExitStack() as stack:
        for _ in range(N_STALLED):
            stack.enter_context(stalled_request(port, token=TOKEN))
            # and as many that stop inside their headers (they never reach a replica)
            stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5)).sendall(
                b"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        deadline = time.monotonic() + BODY_TIMEOUT_S
        busy = None
        while time.monotonic() < deadline:  # until the stalled requests fill the replica
            busy = requests.get(f"{url}/v1/model", headers=auth, timeout=BODY_TIMEOUT_S)
            if busy.status_code == 503:
                break
            time.sleep(0.05)
        assert busy is not None and busy.status_code == 503, busy.text if busy is not None else "no answer"
        assert "max_ongoing_requests" in busy.json()["detail"] and busy.headers["retry-after"] == "1"
        health = requests.get(f"{url}/healthz", timeout=BODY_TIMEOUT_S)
        assert health.status_code == 200 and health.json() == {"status": "ok"}


def test_an_audit_log_that_fails_is_a_json_500_and_the_output_is_withheld(hostile):
    url, _, audit = hostile
    audit.unlink(missing_ok=True)
    audit.mkdir()  # appends now fail with IsADirectoryError
    try:
        r = requests.post(f"{url}/v1/generate", json={"prompt": "ab", "max_new_bytes": 2, "seed": 0},
                          headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    finally:
        shutil.rmtree(audit)
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    out = r.json()
    assert str(audit) in out["detail"] and "withheld" in out["detail"] and "text" not in out and out["request_id"]


def test_an_unhandled_exception_is_a_json_500_with_a_detail():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from serve.guard import RequestGuard

    app = FastAPI()
    app.add_middleware(RequestGuard)

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    r = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert r.status_code == 500 and "RuntimeError" in r.json()["detail"]


def test_a_client_that_leaves_mid_body_is_a_disconnect_not_an_error():
    # Serve's receive() raises TaskCancelledError once the proxy gives up on a client that left
    import asyncio

    from ray.exceptions import TaskCancelledError

    from serve.guard import read_body

    async def receive():
        raise TaskCancelledError()

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"headers": [(b"content-length", b"50")]}
    assert asyncio.run(read_body(scope, receive, send, limit=1000, timeout_s=5)) is None
    assert sent == []  # nobody is there to answer
