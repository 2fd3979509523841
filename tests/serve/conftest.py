"""Serve on a free 127.0.0.1 port in the session Ray, once per module: a tiny causal and a tiny diffusion model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import requests
import pytest
import torch

from bitlm.checkpoint import save_pretrained
from bitlm.config import ModelConfig
from bitlm.model import BitTransformerLM
from serve.local import free_port, wait_for

TOKEN = "test-token-7f3a"
# Skewed reference marginals: the untrained models' near-uniform bits then score S well below 1,
# so floors of 1.0 block every sample.
REFERENCE = [0.2] * 8 + [0.5]


def tiny_model(causal: bool) -> BitTransformerLM:
    torch.manual_seed(0)
    model = BitTransformerLM(ModelConfig.from_name("tiny", causal=causal))
    model.set_reference_marginals(REFERENCE)
    return model


@dataclass
class Server:
    url: str  # the causal app
    diffusion_url: str  # the diffusion app (route prefix /diffusion)
    audit_log: Path
    causal_dir: Path
    diffusion_dir: Path
    limits: dict

    def client(self, token: str | None = TOKEN) -> requests.Session:
        session = requests.Session()
        if token:
            session.headers["Authorization"] = f"Bearer {token}"
        return session


LIMITS = {"max_prompt_bytes": 64, "max_new_bytes": 32, "max_score_bytes": 2048, "max_body_bytes": 4096,
          "max_batch_size": 8, "batch_wait_timeout_s": 0.2}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(causal, diffusion) save_pretrained directories of untrained tiny models."""
    root = tmp_path_factory.mktemp("serve")
    return save_pretrained(tiny_model(True), root / "causal"), save_pretrained(tiny_model(False), root / "diffusion")


@pytest.fixture(scope="module")
def server(ray_local, model_dirs):
    from ray import serve

    from serve.app import build_app

    causal_dir, diffusion_dir = model_dirs
    root = causal_dir.parent
    audit = root / "audit.jsonl"
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = {"allowed_roots": [str(root)], "api_token": TOKEN, "audit_log": str(audit), "num_cpus": 0.5, **LIMITS}
    serve.run(build_app({"model": str(causal_dir), **common}), name="causal", route_prefix="/", blocking=False)
    serve.run(build_app({"model": str(diffusion_dir), **common}), name="diffusion", route_prefix="/diffusion",
              blocking=False)
    url = f"http://127.0.0.1:{port}"
    for u in (url, f"{url}/diffusion"):  # both apps answer once their replicas are up
        wait_for(f"{u}/healthz", 60)
    yield Server(url=url, diffusion_url=f"{url}/diffusion", audit_log=audit, causal_dir=causal_dir,
                 diffusion_dir=diffusion_dir, limits=LIMITS)
    serve.shutdown()
