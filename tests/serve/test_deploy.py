"""`serve deploy` of serve/serve_config.yaml (paths and port filled in) to a local head started with `ray start`."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

from bitlm.checkpoint import save_pretrained
from tests.conftest import BIN, free_port, wait_for
from tests.serve.conftest import tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CONFIG = Path(__file__).resolve().parents[2] / "serve" / "serve_config.yaml"


def test_serve_deploy_of_the_config_file_serves_gated_generations(ray_head, tmp_path):
    address, env = ray_head
    model = save_pretrained(tiny_model(True), tmp_path / "model")
    config = yaml.safe_load(CONFIG.read_text())
    port = free_port()
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args.update(model=str(model), allowed_roots=[str(tmp_path)], audit_log=str(tmp_path / "audit.jsonl"))
    deployed = tmp_path / "serve_config.yaml"
    deployed.write_text(yaml.safe_dump(config))
    done = subprocess.run([str(BIN / "serve"), "deploy", str(deployed), "--address", address], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz", 180)
        body = json.dumps({"prompt": "To be", "max_new_bytes": 8, "seed": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/generate", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            reply = json.loads(response.read())
        assert "passed" in reply["gate"] and reply["n_bits"] > 0
        assert len((tmp_path / "audit.jsonl").read_text().splitlines()) == 1
    finally:
        subprocess.run([str(BIN / "serve"), "shutdown", "-y", "--address", address], env=env,
                       capture_output=True, text=True, timeout=120)
