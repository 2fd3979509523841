"""The Ray Serve application: a FastAPI ingress over one bitlm model, safety-gated and batched.

No `from __future__ import annotations` here: Serve rebuilds the route signatures in the replica,
where string annotations of the request models would not resolve.

    serve run serve.app:build_app model=runs/demo/model        # or: bitlm serve --model runs/demo/model
"""


import asyncio
import json
import math
import secrets
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve
from ray.serve import Application

from bitlm.rundir import run_safety_config
from bitlm.sampling import resolve_sampling_unit

from .audit import AuditLog
from .gating import MIN_TEMPERATURE, MIN_TOP_P, Job, run_gated_isolated
from .guard import RESERVED_SLOTS, UNAUTHORIZED, RequestGuard, token_digest, token_matches
from .model_sources import resolve_source
from .schemas import (AppArgs, Batch, GenerateRequest, GenerateResponse, Health, ModelInfo, ScoreRequest,
                      ScoreResponse, Telemetry, Timings)

STATIC_INDEX = Path(__file__).resolve().parent / "static" / "index.html"

api = FastAPI(title="bitlm", version="1", description="Safety-gated generation and scoring with a bit-native LM.")
_bearer = HTTPBearer(auto_error=False, description="Needed on /v1 when the server has BITLM_API_TOKEN set.")


class ApiError(Exception):
    """An error answer (4xx, or 500 for the audit log) whose message names the field, limit or file."""

    def __init__(self, status: int, detail: str, **extra: Any):
        self.status, self.detail, self.extra = status, detail, extra


def _field(loc: tuple) -> str:
    if loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:]
    return ".".join(str(p) for p in loc) or "body"


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [{"field": _field(tuple(e.get("loc", ()))), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
              for e in exc.errors()]
    for e in errors:
        if e["type"] == "json_invalid":
            e["field"], e["msg"] = "body", f"malformed JSON: {e['msg']}"
    detail = "; ".join(f"{e['field']}: {e['msg']}" for e in errors) or "body: invalid request"
    return JSONResponse(status_code=422, content={"detail": detail, "errors": errors})


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail
    if exc.status_code == 400 and detail == "There was an error parsing the body":  # e.g. JSON nested too deeply
        detail = "body: malformed JSON (it could not be parsed)"
    return JSONResponse(status_code=exc.status_code, content={"detail": detail}, headers=exc.headers)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(status_code=exc.status, content={"detail": exc.detail, **exc.extra}, headers=headers)


api.add_middleware(RequestGuard)


def _authorize(request: Request, credentials: Optional[HTTPAuthorizationCredentials] = Depends(_bearer)) -> None:
    # RequestGuard checked the token before the body was read; this declares the scheme in the OpenAPI spec
    if not token_matches(request.headers.get("authorization"), getattr(request.app.state, "api_token_sha256", None)):
        raise ApiError(401, UNAUTHORIZED)


@serve.deployment
@serve.ingress(api)
class BitLMServer:
    """One replica: the model, its audit log and the batch queue of generation requests."""

    def __init__(self, settings: dict[str, Any]):
        import torch

        from bitlm.checkpoint import from_pretrained
        from bitlm.config import to_dict

        self.args = AppArgs.model_validate(settings["args"])
        torch.set_num_threads(max(1, math.floor(self.args.num_cpus)))
        self.model = from_pretrained(settings["model_dir"])  # safetensors only (resolve_source checked it)
        self.model.eval()
        self.name = self.args.name or self.args.model
        self.audit = AuditLog(settings["audit_log"])
        self._model_lock = threading.Lock()  # the batch thread and /v1/score share one model
        api.state.api_token_sha256 = settings.get("api_token_sha256")
        api.state.max_body_bytes = self.args.max_body_bytes
        api.state.body_timeout_s = self.args.body_timeout_s
        api.state.max_ongoing_requests = self.args.max_ongoing_requests
        self._generate_batch.set_max_batch_size(self.args.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        cfg = self.model.config
        self.info = ModelInfo(config=json.loads(json.dumps(to_dict(cfg))), n_parameters=self.model.num_parameters(),
                              source=self.args.model, telemetry_reference=self.model.reference_marginals.tolist())

    @api.get("/healthz", response_model=Health)
    async def healthz(self) -> Health:
        return Health(status="ok")

    @api.get("/", include_in_schema=False)
    async def index(self):
        if not STATIC_INDEX.is_file():
            raise ApiError(404, f"playground page not installed: {STATIC_INDEX.name} is missing from serve/static/")
        return FileResponse(STATIC_INDEX, media_type="text/html")

    @api.get("/v1/model", response_model=ModelInfo, dependencies=[Depends(_authorize)])
    async def model_info(self) -> ModelInfo:
        return self.info

    @api.post("/v1/score", response_model=ScoreResponse, dependencies=[Depends(_authorize)])
    async def score(self, body: ScoreRequest) -> ScoreResponse:
        from bitlm.evaluation import evaluate_text

        data = body.text.encode("utf-8")
        if len(data) > self.args.max_score_bytes:
            raise ApiError(422, f"text: {len(data)} bytes exceeds the limit of {self.args.max_score_bytes} bytes")
        result = await asyncio.to_thread(self._locked, evaluate_text, self.model, data)
        exact = "bpb" in result
        return ScoreResponse(bpb=result["bpb"] if exact else result["elbo_bpb"], bound="exact" if exact else "elbo",
                             n_bytes=result["n_bytes"],
                             telemetry=Telemetry(K=result["K"], C=result["C"], S=result["S"]))

    @api.post("/v1/generate", response_model=GenerateResponse, dependencies=[Depends(_authorize)],
              responses={422: {"description": "Invalid input, a broken limit, or a blocked output in strict mode"}})
    async def generate(self, body: GenerateRequest):
        arrived = time.perf_counter()
        request_id = uuid.uuid4().hex
        job = self._job(body)
        outcome, started, finished, batch = await self._generate_batch((job, arrived))
        if isinstance(outcome, Exception):  # this job alone failed; the rest of its batch was answered
            raise outcome
        verdict = outcome.verdict
        record = verdict.to_dict()
        # off the event loop: the append waits on a file lock that other replicas may hold
        try:
            await asyncio.to_thread(self.audit.record, request_id, record, model=self.name, mode=job.mode,
                                    strict=body.strict, prompt_bytes=len(job.prompt))
        except OSError as err:  # no output leaves without its audit record
            raise ApiError(500, f"audit log {self.audit.path}: the verdict could not be recorded "
                                f"({err.strerror or type(err).__name__}); the output is withheld",
                           request_id=request_id) from None
        gate = {k: v for k, v in record.items() if k != "text"}  # a blocked text must not leave
        if not verdict.passed and body.strict:
            raise ApiError(422, f"safety gate blocked the output after {len(verdict.attempts)} attempt(s): "
                                f"{'; '.join(verdict.reasons)}", gate=gate, request_id=request_id)
        now = time.perf_counter()
        return GenerateResponse(
            text=verdict.text if verdict.passed else None,
            n_bits=len(outcome.new_bytes) * self.model.config.bits_per_byte,
            telemetry=Telemetry(K=verdict.raw_K, C=verdict.raw_C, S=verdict.raw_S), gate=gate,
            timings=Timings(queue_ms=(started - arrived) * 1e3, generate_ms=(finished - started) * 1e3,
                            total_ms=(now - arrived) * 1e3),
            batch=batch, model=self.name, request_id=request_id)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)  # both reset from the args in __init__
    async def _generate_batch(self, items: list[tuple[Job, float]]) -> list[tuple[Any, float, float, Batch]]:
        started = time.perf_counter()
        outcomes = await asyncio.to_thread(self._locked, run_gated_isolated, self.model, [job for job, _ in items])
        finished = time.perf_counter()
        batch = Batch(id=uuid.uuid4().hex, size=len(items))
        return [(outcome, started, finished, batch) for outcome in outcomes]

    def _locked(self, fn, *args):
        with self._model_lock:
            return fn(*args)

    def _job(self, body: GenerateRequest) -> Job:
        """Check the request against the server's limits and the model; errors name the field."""
        cfg, a = self.model.config, self.args
        prompt = body.prompt.encode("utf-8")
        if len(prompt) > a.max_prompt_bytes:
            raise ApiError(422, f"prompt: {len(prompt)} bytes exceeds the limit of {a.max_prompt_bytes} bytes")
        # an unset max_new_bytes (default 64) shrinks to a lower server limit instead of failing
        n_new = body.max_new_bytes
        if "max_new_bytes" not in body.model_fields_set:
            n_new = min(n_new, a.max_new_bytes)
        if n_new > a.max_new_bytes:
            raise ApiError(422, f"max_new_bytes: {n_new} exceeds the limit of {a.max_new_bytes}")
        if body.mode == "causal" and not cfg.causal:
            raise ApiError(422, "mode: this model is non-causal (diffusion); use mode 'diffusion'")
        if body.mode == "diffusion":
            if cfg.causal:
                raise ApiError(422, "mode: diffusion needs a non-causal model; this one is causal")
            room = cfg.max_input_ids // cfg.bits_per_byte
            if len(prompt) + n_new > room:
                raise ApiError(422, f"max_new_bytes: prompt ({len(prompt)} bytes) + max_new_bytes "
                                    f"({n_new}) exceeds the diffusion context of {room} bytes")
        if body.mode == "causal":
            try:
                resolve_sampling_unit(cfg, body.sampling_unit)
            except ValueError as err:
                raise ApiError(422, f"sampling_unit: {err}") from None
        return Job(prompt=prompt, max_new_bytes=n_new, mode=body.mode, sampling_unit=body.sampling_unit,
                   temperature=max(body.temperature, MIN_TEMPERATURE), top_k=body.top_k, top_p=None if body.top_p >= 1.0 else max(body.top_p, MIN_TOP_P),
                   diffusion_steps=body.diffusion_steps, schedule=body.schedule,
                   seed=secrets.randbelow(2**31) if body.seed is None else body.seed,
                   c_floor=a.c_floor if body.c_floor is None else body.c_floor,
                   s_floor=a.s_floor if body.s_floor is None else body.s_floor, max_retries=body.max_retries)


def with_run_floors(a: AppArgs, model_dir: Path) -> AppArgs:
    """`a` with the gate floors it leaves open taken from the served run's safety section (else the defaults)."""
    safety, _ = run_safety_config(model_dir)
    return a.model_copy(update={"c_floor": safety.c_floor if a.c_floor is None else a.c_floor,
                                "s_floor": safety.s_floor if a.s_floor is None else a.s_floor})


def build_app(args: dict[str, Any] | AppArgs) -> Application:
    """The Serve application for `args.model` (validated, resolved and checked here, in the caller's process)."""
    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    model_dir = resolve_source(a.model, a.allowed_roots or None)
    a = with_run_floors(a, model_dir)
    audit_log = AuditLog(Path(a.audit_log).expanduser().resolve()).path  # fails here, not at the first request
    token = a.token()
    # deployment init args are stored in Ray's config store and shown by the dashboard: send a digest
    settings = {"args": a.model_dump() | {"api_token": None}, "model_dir": str(model_dir),
                "api_token_sha256": token_digest(token) if token else None, "audit_log": str(audit_log)}
    # RequestGuard turns requests beyond a.max_ongoing_requests away; the reserve is for /healthz
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": a.num_cpus},
                               "max_ongoing_requests": a.max_ongoing_requests + RESERVED_SLOTS}
    if a.autoscaling:
        options["autoscaling_config"] = a.autoscaling
    else:
        options["num_replicas"] = a.num_replicas
    return BitLMServer.options(**options).bind(settings)
