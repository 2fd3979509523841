"""The ASGI guard in front of every route: request slots, the token before the body, body limits, JSON 5xx.

A slow client cannot hold the server: /v1 without the token is answered 401 from the headers
alone, a body must arrive within body_timeout_s (408), a replica takes at most
max_ongoing_requests requests besides /healthz (503 beyond), and Serve's own limit leaves
RESERVED_SLOTS more, so /healthz answers while every request slot is taken.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from typing import Any, Optional

from ray.exceptions import TaskCancelledError

from .schemas import AppArgs

HEALTH_PATH = "/healthz"
RESERVED_SLOTS = 8  # Serve-level slots above max_ongoing_requests, for /healthz
UNAUTHORIZED = "authorization: a valid 'Authorization: Bearer <token>' header is required"
BODY_METHODS = ("POST", "PUT", "PATCH")

log = logging.getLogger("ray.serve")


def token_digest(token: str) -> str:
    """What replicas hold instead of the token: its SHA-256, so the secret is not in Ray's config store."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_matches(authorization: Optional[str], expected_sha256: Optional[str]) -> bool:
    """Whether an Authorization header carries the bearer token (always, when no token is configured)."""
    if not expected_sha256:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    given = token.strip() if scheme.lower() == "bearer" else ""
    # compare digests in constant time; an empty or missing token never matches
    return bool(given) and hmac.compare_digest(token_digest(given), expected_sha256)


class RequestGuard:
    """ASGI middleware; in this order: slots (503), token on /v1 (401), size (413), deadline (408), UTF-8 (422).

    /healthz skips all of them. Any exception a route leaves unhandled becomes a JSON 500 with a detail.
    """

    def __init__(self, app):
        self.app = app
        self.n_ongoing = 0  # one replica is one event loop: no lock needed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = route_path(scope)
        if path == HEALTH_PATH:
            return await self._answered(scope, receive, send)
        state = scope["app"].state if "app" in scope else None
        if path.startswith("/v1/"):
            authorization = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            if not token_matches(authorization, getattr(state, "api_token_sha256", None)):
                return await reply(send, 401, {"detail": UNAUTHORIZED}, [(b"www-authenticate", b"Bearer")])
        limit = _setting(state, "max_ongoing_requests")
        if self.n_ongoing >= limit:
            return await reply(send, 503, {"detail": f"server busy: {self.n_ongoing} requests in progress on this "
                                                     f"replica (max_ongoing_requests {limit}); retry shortly"},
                               [(b"retry-after", b"1")])
        self.n_ongoing += 1
        try:
            if scope["method"] in BODY_METHODS:
                body = await read_body(scope, receive, send, _setting(state, "max_body_bytes"),
                                       _setting(state, "body_timeout_s"))
                if body is None:  # answered already (413, 408, 422), or the client left
                    return
                receive = _replay(body, receive)
            await self._answered(scope, receive, send)
        finally:
            self.n_ongoing -= 1

    async def _answered(self, scope, receive, send) -> None:
        """Run the app; an exception before the response started is answered as JSON 500."""
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as err:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise  # too late for a response of our own: let the server close the connection
            await reply(send, 500, {"detail": f"internal server error ({type(err).__name__}); "
                                              "the server log has the details"})


def route_path(scope) -> str:
    """The request path below the application's route prefix."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


async def read_body(scope, receive, send, limit: int, timeout_s: float) -> Optional[bytes]:
    """The whole body, or None after answering 413 (too large), 408 (too slow) or 422 (not UTF-8)."""
    declared = dict(scope.get("headers") or []).get(b"content-length", b"").decode("latin-1")
    if declared.isdigit() and int(declared) > limit:
        await reply(send, 413, _too_large(int(declared), limit))
        return None
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):  # one deadline for the whole body: a trickle does not reset it
            while True:
                try:
                    message = await receive()
                except TaskCancelledError:
                    # the proxy cancelled its half of the request (the client left mid-body): a
                    # disconnect, not a server error; raised on, every such client logged a traceback
                    return None
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    break
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        await reply(send, 408, {"detail": f"body: {size} of {declared or 'an unknown number of'} bytes arrived "
                                          f"within {timeout_s:g} s (body_timeout_s); send the whole body at once"})
        return None
    if size > limit:
        await reply(send, 413, _too_large(size, limit))
        return None
    body = b"".join(chunks)
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as err:
        await reply(send, 422, {"detail": f"{_non_utf8_fields(body)}: invalid UTF-8 in the request body "
                                          f"(byte {err.start})"})
        return None
    return body


def _setting(state: Any, name: str) -> Any:
    value = getattr(state, name, None)
    return AppArgs.model_fields[name].default if value is None else value


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _too_large(size: int, limit: int) -> dict:
    return {"detail": f"body: {size} bytes exceeds the limit of {limit} bytes (max_body_bytes)"}


def _non_utf8_fields(body: bytes) -> str:
    """The top-level JSON fields whose strings hold the invalid bytes, or "body" when that cannot be told."""
    try:
        data = json.loads(body.decode("utf-8", errors="surrogateescape"))
    except (ValueError, RecursionError):
        return "body"
    if not isinstance(data, dict):
        return "body"
    bad = [k for k, v in data.items() if isinstance(v, str) and any("\udc80" <= c <= "\udcff" for c in v)]
    return ", ".join(bad) or "body"


async def reply(send, status: int, content: dict, headers: Optional[list[tuple[bytes, bytes]]] = None) -> None:
    """Send a whole JSON response."""
    payload = json.dumps(content).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": payload})
