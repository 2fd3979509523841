"""Request and response models of the HTTP API, and the application's arguments."""

from __future__ import annotations

import math
import os
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bitlm.config import NoiseSchedule, SafetyConfig

Mode = Literal["causal", "diffusion"]


def _utf8_text(value: str, field: str) -> str:
    # a JSON "\udc80" escape is valid JSON but no UTF-8 text: refuse it here, before it reaches the codec
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{field} must be valid UTF-8 text (it holds a lone surrogate)") from None
    return value


class GenerateRequest(BaseModel):
    """One gated generation; limits on prompt bytes and max_new_bytes are the server's (see AppArgs)."""

    # strict: no silent coercion of wrong JSON types ("5" or true for an int); ints still fill float fields
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, description="Text to continue: non-empty UTF-8.")
    max_new_bytes: int = Field(64, ge=1, description="Bytes to generate (upper limit: the server's max_new_bytes).")
    mode: Mode = "causal"
    temperature: float = Field(0.8, gt=0, allow_inf_nan=False, description="Below 1e-30 sampled as 1e-30 (greedy).")
    top_k: Optional[int] = Field(None, ge=1, description="Causal mode only.")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False, description="Nucleus mass; causal mode only.")
    sampling_unit: Optional[Literal["bit", "byte"]] = Field(
        None, description="What one draw picks, and so what temperature/top_k/top_p act on: 'byte' (the joint "
                          "over a byte's bit patterns; patched models and the byte baseline) or 'bit' (each bit's "
                          "2 values; flat and patched bit models). null: the model's default. Causal mode only.")
    diffusion_steps: int = Field(16, ge=1, le=64)
    schedule: NoiseSchedule = "cosine"
    seed: Optional[int] = Field(None, ge=0, lt=2**63, description="Attempt k uses seed + k; null: the server picks.")
    c_floor: Optional[float] = Field(None, ge=0, le=1, allow_inf_nan=False, description="null: the server's default.")
    s_floor: Optional[float] = Field(None, ge=0, le=1, allow_inf_nan=False, description="null: the server's default.")
    strict: bool = Field(False, description="A blocked output is HTTP 422 instead of 200 with text null.")
    max_retries: int = Field(2, ge=0, le=5)

    @field_validator("prompt")
    @classmethod
    def _prompt_utf8(cls, value: str) -> str:
        return _utf8_text(value, "prompt")


class Telemetry(BaseModel):
    K: Optional[float]
    C: float
    S: float


class Timings(BaseModel):
    queue_ms: float  # from arrival at the replica until its batch starts
    generate_ms: float  # the batch's sampling and gating (shared by the callers in the batch)
    total_ms: float


class Batch(BaseModel):
    id: str = Field(description="Names the batch this request was sampled in; callers of one batch share it.")
    size: int = Field(description="Requests sampled together in that batch.")


class GenerateResponse(BaseModel):
    text: Optional[str] = Field(description="Prompt + continuation; null when the gate blocked every attempt.")
    n_bits: int = Field(description="Bits sampled for the kept (or last) attempt's continuation.")
    telemetry: Telemetry
    gate: dict[str, Any] = Field(description="The gate's verdict (bitlm.safety.Verdict) with one entry per attempt.")
    timings: Timings
    batch: Batch
    model: str
    request_id: str


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    text: str = Field(min_length=2, description="At least 2 bytes of UTF-8 text.")

    @field_validator("text")
    @classmethod
    def _text_utf8(cls, value: str) -> str:
        return _utf8_text(value, "text")


class ScoreResponse(BaseModel):
    bpb: float = Field(description="Bits per byte; for a diffusion model its ELBO (an upper bound).")
    bound: Literal["exact", "elbo"]
    n_bytes: int
    telemetry: Telemetry


class ModelInfo(BaseModel):
    config: dict[str, Any]
    n_parameters: int
    source: str
    telemetry_reference: list[float] = Field(description="Per-phase P(bit = 1) that S is measured against.")


class Health(BaseModel):
    status: Literal["ok"]


class AppArgs(BaseModel):
    """Arguments of build_app (also `serve run serve.app:build_app model=...` and serve_config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="save_pretrained dir, Ray Train checkpoint dir, runs:/... or models:/...")
    allowed_roots: list[str] = Field(default_factory=list,
                                     description="Directories a local source may resolve into "
                                                 "(default: BITLM_SERVE_ROOTS, else the working directory).")
    api_token: Optional[str] = Field(None, description="Bearer token for /v1 (default: BITLM_API_TOKEN).")
    audit_log: str = Field("serve_audit.jsonl", description="JSON-lines file, one line per gate verdict.")
    c_floor: Optional[float] = Field(None, ge=0, le=1, description="Default of the gate; null: the served run's "
                                     f"safety.c_floor, else {SafetyConfig().c_floor}.")
    s_floor: Optional[float] = Field(None, ge=0, le=1, description="Default of the gate; null: the served run's "
                                     f"safety.s_floor, else {SafetyConfig().s_floor}.")
    max_prompt_bytes: int = Field(4096, ge=1)
    max_new_bytes: int = Field(512, ge=1)
    max_score_bytes: int = Field(65536, ge=2)
    max_body_bytes: int = Field(131072, ge=256)
    max_batch_size: int = Field(8, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.05, ge=0, le=10)
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, gt=0)
    autoscaling: Optional[dict[str, Any]] = Field(None, description="Serve autoscaling_config; replaces num_replicas.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests besides /healthz a replica holds at once "
                                      "(reading a body, queued or computing); more are answered 503.")
    body_timeout_s: float = Field(10.0, gt=0, le=600,
                                  description="A request body must arrive within this many seconds (else 408).")
    name: Optional[str] = Field(None, description="Model name in responses (default: the source).")

    @field_validator("batch_wait_timeout_s", "body_timeout_s", "num_cpus", "c_floor", "s_floor")
    @classmethod
    def _finite(cls, value: Optional[float]) -> Optional[float]:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be finite")
        return value

    def token(self) -> Optional[str]:
        return self.api_token or os.environ.get("BITLM_API_TOKEN") or None
