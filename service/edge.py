"""The service's edge, over every route (BentoML's own included): the concurrency limit, the
SIGTERM drain, the headers every response carries, and errors as OpenAI-style JSON.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
from typing import Any, ClassVar

import aiohttp
import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from service.api import ApiError, error_body
from service.metrics import flywheel_metrics
from service.tracing import TRACE_HEADER, current_trace_id

log = logging.getLogger("flywheel.service")
RETRY_AFTER_S = 2  # what 429 and 503 answers ask clients to wait
READY_PROBE_S = 3.0  # how long /readyz waits for the generator's own answer


class CurrentVersion:
    """The champion's version, shared with the header middleware of this process (for the
    responses no model answered)."""

    value = ""


class Draining:
    """Set once the process got SIGTERM: new requests get 503, those in flight finish."""

    active = False


def drain_on_sigterm() -> None:
    """Chain a SIGTERM handler before the server's own (which stops accepting connections
    and waits for in-flight requests), so requests on open connections are refused at once."""
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: Any) -> None:
        Draining.active = True
        if callable(previous):
            previous(signum, frame)

    with contextlib.suppress(ValueError):  # not the main thread (in-process tests)
        signal.signal(signal.SIGTERM, handler)


class ServiceEdge:
    """ASGI middleware over every route, BentoML's own included.

    Every response carries `x-model-version` and `x-trace-id`; 429 and 503 carry
    `Retry-After`; an error answer that is not JSON (a 404 or 405 from the router, for one) is
    rewritten as an OpenAI error; past `max_concurrency` requests in flight a request gets 429
    at once; while draining, new requests get 503 and `/readyz` says 503 (draining), while
    health and metrics routes still answer. `/health` is `/healthz`.

    The limit is counted here rather than with BentoML's `traffic.max_concurrency`: BentoML's
    middleware sits outside the service's own, so its 429 would reach clients without
    `Retry-After`, `x-model-version` or the OpenAI error shape, and before the drain's 503.
    BentoML's `traffic.timeout` is used as it is.
    """

    OPEN_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metrics", "/health"})
    ALIASES: ClassVar[dict[str, str]] = {"/health": "/healthz"}  # as other such servers name it

    def __init__(self, app: Any, max_concurrency: int) -> None:
        self.app = app
        self.slots = anyio.Semaphore(max_concurrency)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path")
        if path in self.OPEN_PATHS:
            if path == "/readyz" and Draining.active:  # not ready from the drain's start
                body = error_body(503, "the service is shutting down", code="draining")
                await _send_json(send, 503, body, [])
                return
            if path in self.ALIASES:
                path = self.ALIASES[path]
                scope = {**scope, "path": path, "raw_path": path.encode()}
            if path == "/readyz":
                await self._ready(scope, receive, send)
                return
            await self._call(scope, receive, send)
            return
        if Draining.active:
            body = error_body(503, "the service is shutting down; retry shortly", code="draining")
            await _send_json(send, 503, body, [(b"connection", b"close")])
            return
        if self.slots.value == 0:
            body = error_body(429, "too many requests in flight; retry shortly", code="overloaded")
            await _send_json(send, 429, body, [])
            return
        async with self.slots:
            await self._call(scope, receive, send)

    async def _ready(self, scope: dict, receive: Any, send: Any) -> None:
        """BentoML's readiness (the generator's, asked over its socket) within
        `READY_PROBE_S`: a generator that does not answer (killed, coming back) is not ready,
        and no probe is left waiting to hold up a shutdown."""
        answered = False

        async def send_marked(message: dict) -> None:
            nonlocal answered
            answered = True
            await send(message)

        with anyio.move_on_after(READY_PROBE_S):
            await self._call(scope, receive, send_marked)
        if not answered:
            message = f"the generator did not answer its readiness probe within {READY_PROBE_S:g} s"
            await _send_json(send, 503, error_body(503, message, code="not_ready"), [])

    async def _call(self, scope: dict, receive: Any, send: Any) -> None:
        held: dict[str, Any] = {}

        async def send_wrapped(message: dict) -> None:
            if message["type"] == "http.response.start":
                status, headers = message["status"], list(message.get("headers", []))
                content_type = dict((k.lower(), v) for k, v in headers).get(b"content-type", b"")
                if status >= 400 and b"json" not in content_type:
                    held.update(status=status, headers=headers, body=b"")  # re-sent as JSON
                    return
                message = {**message, "headers": _edge_headers(headers, status)}
            elif message["type"] == "http.response.body" and held:
                held["body"] += message.get("body", b"")
                if not message.get("more_body"):
                    detail = held["body"].decode(errors="replace").strip() or "error"
                    body = error_body(held["status"], detail)
                    await _send_json(send, held["status"], body, held["headers"])
                return
            await send(message)

        await self.app(scope, receive, send_wrapped)


def _edge_headers(headers: list[tuple[bytes, bytes]], status: int) -> list[tuple[bytes, bytes]]:
    """`x-model-version` (the version that answered, else the champion's), the trace id, and
    `Retry-After` on 429 and 503."""
    kept = [(k, v) for k, v in headers if k.lower() != TRACE_HEADER.encode()]
    if not any(k.lower() == b"x-model-version" for k, _ in kept):
        kept.append((b"x-model-version", CurrentVersion.value.encode() or b"none"))
    if trace_id := current_trace_id():
        kept.append((TRACE_HEADER.encode(), trace_id.encode()))
    if status in (429, 503) and not any(k.lower() == b"retry-after" for k, _ in kept):
        kept.append((b"retry-after", str(RETRY_AFTER_S).encode()))
    return kept


async def _send_json(
    send: Any, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]
) -> None:
    data = json.dumps(body).encode()
    kept = [(k, v) for k, v in headers if k.lower() not in (b"content-type", b"content-length")]
    kept += [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    start = {"type": "http.response.start", "status": status}
    await send({**start, "headers": _edge_headers(kept, status)})
    await send({"type": "http.response.body", "body": data})


# How pydantic tags the member of a union it tried (`str`, `list[TextPart]`): not a field.
UNION_MEMBER = re.compile(r"^(str|int|float|bool|none|\w+\[.*\]|[A-Z]\w*)$")


def _param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body" and not UNION_MEMBER.match(str(p))]
    return ".".join(parts) or None


def _validation_error(exc: RequestValidationError) -> ApiError:
    # The deepest error names the field best (in a union, the member that got furthest).
    first = max(exc.errors(), key=lambda e: len(e.get("loc", ())))
    kind, loc = first["type"], tuple(first.get("loc", ()))
    if kind == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "invalid JSON")
        return ApiError(400, f"malformed JSON: {reason} (at character {loc[-1]})")
    if loc == ("body",):
        if kind == "missing":
            return ApiError(400, "a JSON object is required as the request body")
        return ApiError(400, "the request body must be a JSON object")
    param = _param(loc)
    if kind == "extra_forbidden":
        return ApiError(
            400,
            f"{param}: this server does not support this parameter",
            param=param,
            code="unsupported_parameter",
        )
    return ApiError(422, f"{param}: {first['msg']}", param=param)


def _endpoint(request: Request) -> str:
    """The name of the route a request reached (its `endpoint` label), or "other"."""
    route = request.scope.get("route")
    return str(getattr(route, "name", None) or "other")


def install_error_handlers(app: FastAPI) -> None:
    """Client errors as OpenAI-style JSON; unexpected ones as a JSON 500, details in the log."""

    def answer(request: Request, error: ApiError) -> JSONResponse:
        if error.status < 500:
            endpoint = _endpoint(request)
            flywheel_metrics().client_errors.labels(endpoint, str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return answer(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return answer(request, _validation_error(exc))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        error = ApiError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))
        return answer(request, error)

    @app.exception_handler(aiohttp.ClientConnectionError)
    async def _unreachable(request: Request, exc: aiohttp.ClientConnectionError) -> JSONResponse:
        # The generator is stopping (a SIGTERM reached it first) or restarting.
        log.warning("generator unreachable: %s", exc)
        error = ApiError(503, "the model cannot be reached; retry shortly", code="unavailable")
        return answer(request, error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if int(getattr(exc, "error_code", 500) or 500) == 503:  # BentoML: generator queue full
            return answer(request, ApiError(503, "the model is busy; retry shortly", code="busy"))
        log.exception("unexpected error")
        return answer(request, ApiError(500, "internal error", code="server_error"))


async def json_bodies_only(request: Request) -> None:
    """State-changing requests must be JSON: a form or text/plain body (what a web page can
    send across origins without asking) is refused before it reaches a handler."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise ApiError(415, "send the body as JSON (Content-Type: application/json)")
