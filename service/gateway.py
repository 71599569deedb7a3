"""What the public routes do behind their typed bodies: generate, stream, log, count, answer.

FastAPI validates every body against the models in `components/serving/api.py`; the handlers
here turn any client mistake into a 4xx with an OpenAI-style JSON error naming the field, and
nothing a client sends surfaces as a 500.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import secrets
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

import aiohttp
import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from starlette.exceptions import HTTPException

from components.config import MemoryConfig, ServeConfig
from components.inference_store import InferenceRecord, InferenceStore, StoreBusy, UnknownRequest
from components.memory.store import CorrectionMemory, CorrectionRejected, Recall
from components.registry.register import CHAMPION
from components.retrieval.index import DocsIndex, Hit
from components.serving.api import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
    FeedbackResponse,
    GenerateRequest,
    GenerateResponse,
    OpenAIBody,
    ReloadRequest,
    chat_chunk,
    chat_completion,
    completion_chunk,
    error_body,
    finish_reason,
    model_card,
    sse,
    text_completion,
    usage_chunk,
    wire,
)
from components.serving.auth import admin_key, api_key
from components.serving.model import (
    GenerationInput,
    GenerationOutput,
    ModelNotFound,
    default_model_uri,
    resolve_model_uri,
)
from components.serving.router import Router
from components.text import scrub_pii
from service.tracing import TRACE_HEADER, current_trace_id, tracer

log = logging.getLogger("flywheel.service")
MEMORY_HEADER = "x-flywheel-memory"  # hit, miss or off on every generation response
CACHE_HEADER = "x-flywheel-cache"  # hit, miss, error or off: what the response cache did
RETRIEVAL_HEADER = "x-flywheel-retrieval"  # on (the docs were searched) or off
ROUTE_HEADER = "x-flywheel-route"  # champion, scope, another model's name, or off (not judged)
MODEL_HEADER = "x-flywheel-model"  # the name of the served model that answered
RETRY_AFTER_S = 2  # what 429 and 503 answers ask clients to wait
ENDPOINTS = {
    "/generate": "generate",
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/models": "models",
    "/feedback": "feedback",
    "/admin/reload": "reload",
}


@functools.cache
def playground_html() -> str:
    """The playground page: a prompt box, a streamed answer, thumbs up/down, a correction."""
    from pathlib import Path

    return (Path(__file__).parent / "playground.html").read_text(encoding="utf-8")


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
    at once; while draining, new requests get 503. Health and metrics routes are never refused.
    """

    OPEN_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metrics"})

    def __init__(self, app: Any, max_concurrency: int) -> None:
        self.app = app
        self.slots = anyio.Semaphore(max_concurrency)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("path") in self.OPEN_PATHS:
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
    import json

    data = json.dumps(body).encode()
    kept = [(k, v) for k, v in headers if k.lower() not in (b"content-type", b"content-length")]
    kept += [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    start = {"type": "http.response.start", "status": status}
    await send({**start, "headers": _edge_headers(kept, status)})
    await send({"type": "http.response.body", "body": data})


def _param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


def _validation_error(exc: RequestValidationError) -> ApiError:
    first = exc.errors()[0]
    kind, loc = first["type"], tuple(first.get("loc", ()))
    if kind == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "invalid JSON")
        return ApiError(400, f"malformed JSON: {reason} (at character {loc[-1]})")
    if loc == ("body",):
        if kind == "missing":
            return ApiError(400, "a JSON object is required as the request body")
        return ApiError(400, "the request body must be a JSON object")
    param = _param(loc)
    return ApiError(422, f"{param}: {first['msg']}", param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Client errors as OpenAI-style JSON; unexpected ones as a JSON 500, details in the log."""

    def answer(request: Request, error: ApiError) -> JSONResponse:
        if error.status < 500:
            endpoint = ENDPOINTS.get(request.url.path, "other")
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


Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))]


def _check(credentials: HTTPAuthorizationCredentials | None, key: str, what: str) -> None:
    token = credentials.credentials if credentials else ""
    if not secrets.compare_digest(token.encode(), key.encode()):
        raise ApiError(
            401,
            f"missing or wrong {what} (Authorization: Bearer <key>)",
            code="invalid_api_key",
            headers={"www-authenticate": "Bearer"},
        )


async def client_auth(credentials: Bearer) -> None:
    """`FLYWHEEL_API_KEY` when set; generation and feedback are open otherwise."""
    key = api_key()
    if key is not None:
        _check(credentials, key, "API key")


async def admin_auth(credentials: Bearer) -> None:
    """Admin actions always need the admin key (`FLYWHEEL_ADMIN_KEY` or the home's token)."""
    _check(credentials, admin_key(), "admin key")


def client_id(request: Request) -> str:
    """Who sent a request, for per-client limits: a hash of its API key, else its address."""
    import hashlib

    token = request.headers.get("authorization", "")
    host = request.client.host if request.client else "unknown"
    return hashlib.sha256((token or host).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Metrics:
    generated_tokens: Any
    prompt_tokens: Any
    time_to_first_token: Any
    feedback: Any
    model_version: Any
    client_errors: Any
    memory_lookups: Any
    memory_entries: Any
    response_cache: Any
    retrieval_passages: Any
    routes: Any
    answers: Any


@functools.cache
def flywheel_metrics() -> Metrics:
    """The project's Prometheus metrics, created once per process (multiprocess-safe)."""
    import bentoml

    return Metrics(
        generated_tokens=bentoml.metrics.Counter(
            name="flywheel_generated_tokens",
            documentation="Tokens generated",
            labelnames=["model_version", "endpoint"],
        ),
        prompt_tokens=bentoml.metrics.Counter(
            name="flywheel_prompt_tokens",
            documentation="Prompt tokens processed",
            labelnames=["model_version", "endpoint"],
        ),
        time_to_first_token=bentoml.metrics.Histogram(
            name="flywheel_time_to_first_token_seconds",
            documentation="Time until the first streamed token",
            labelnames=["endpoint"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32),
        ),
        feedback=bentoml.metrics.Counter(
            name="flywheel_feedback",
            documentation="Feedback received, by rating",
            labelnames=["rating", "model_version"],
        ),
        model_version=bentoml.metrics.Gauge(
            name="flywheel_model_version",
            documentation="1 for the served model version",
            labelnames=["model_name", "version"],
            multiprocess_mode="livemax",
        ),
        client_errors=bentoml.metrics.Counter(
            name="flywheel_client_errors",
            documentation="Requests rejected with a 4xx",
            labelnames=["endpoint", "status"],
        ),
        memory_lookups=bentoml.metrics.Counter(
            name="flywheel_memory_lookups",
            documentation="Generation requests by what the correction memory did: hit, miss, off",
            labelnames=["result"],
        ),
        memory_entries=bentoml.metrics.Gauge(
            name="flywheel_memory_entries",
            documentation="Corrections the memory serves under its trust policy",
            multiprocess_mode="livemax",
        ),
        response_cache=bentoml.metrics.Counter(
            name="flywheel_response_cache_lookups",
            documentation="Model generations by what the response cache did: hit, miss, "
            "error (unreachable: generated without it), off (sampling, or the cache disabled)",
            labelnames=["result"],
        ),
        retrieval_passages=bentoml.metrics.Histogram(
            name="flywheel_retrieval_passages",
            documentation="Documentation passages given to the model with a grounded question",
            buckets=(0, 1, 2, 3, 5, 10, 20),
        ),
        routes=bentoml.metrics.Counter(
            name="flywheel_routes",
            documentation="Questions by where the router sent them (routing on): champion, "
            "scope (the scope reply), the out-of-domain model's name, off (the served "
            "version's domain not known yet)",
            labelnames=["route"],
        ),
        answers=bentoml.metrics.Counter(
            name="flywheel_answers",
            documentation="Answers by the served model that gave them (champion, canary, ...)",
            labelnames=["model", "model_version"],
        ),
    )


async def with_connection_retry(call: Callable[[], Awaitable[Any]], attempts: int = 3) -> Any:
    """Retry a generator call whose pooled connection the generator had already closed.

    Under load the generator's server can close an idle keep-alive connection just as the
    gateway reuses it ("Server disconnected"); the request never reached the model, so
    sending it again on a fresh connection is safe.
    """
    for attempt in range(attempts):
        try:
            return await call()
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            if attempt == attempts - 1:
                raise
            log.warning("generator connection closed under us; retrying (%d)", attempt + 1)
            await anyio.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def _as_output(value: Any) -> GenerationOutput:
    """A generator answer as a `GenerationOutput` (BentoML may hand back its plain dict)."""
    return value if isinstance(value, GenerationOutput) else GenerationOutput.model_validate(value)


def _raise_for(out: GenerationOutput, param: str | None = None) -> None:
    """The generator's error as an API error; `param` names this route's prompt field where
    the generator speaks of the prompt it was given (`/generate` sends its prompt as messages)."""
    if out.error:
        code = out.error_code or "invalid_request_error"
        field = out.error_param
        if param and field in ("messages", "prompt"):
            field = param
        raise ApiError(
            out.error_status, out.error, param=field if out.error_status < 500 else None, code=code
        )


@dataclass(frozen=True)
class Asked:
    """What a request's headers asked for: the correction memory and the docs (unless off)."""

    memory: bool = True
    docs: bool = True


@dataclass(frozen=True)
class Plan:
    """How one request is answered: by the model (asked `item`, grounded in `hits` when
    retrieval is on), or with a `fixed` answer: a correction from the memory (`recall`) or
    the scope reply to a question outside the champion's domain (`route` "scope")."""

    item: GenerationInput
    memory: str  # x-flywheel-memory: hit, miss or off
    recall: Recall | None = None
    route: str = "off"  # x-flywheel-route: champion, scope, another model's name, or off
    similarity: float | None = None  # to the champion's nearest training prompt
    hits: list[Hit] | None = None
    fixed: str | None = None

    def headers(self, out: GenerationOutput) -> dict[str, str]:
        """The answer's headers, given the output of the model that answered."""
        return {
            "x-model-version": out.model_version,
            MODEL_HEADER: out.model,
            MEMORY_HEADER: self.memory,
            CACHE_HEADER: out.cache,
            RETRIEVAL_HEADER: "off" if self.hits is None else "on",
            ROUTE_HEADER: self.route,
        }

    def sources(self) -> dict[str, Any]:
        """The response's `sources` field (an extra OpenAI clients ignore), when grounded."""
        return {} if self.hits is None else {"sources": [hit.source() for hit in self.hits]}


class Gateway:
    """What the public routes do, given the generator dependency."""

    def __init__(
        self,
        settings: ServeConfig,
        generator: Any,
        model_name: str,
        memory: MemoryConfig,
        docs: DocsIndex | None = None,
    ) -> None:
        self.settings = settings
        self.generator = generator
        self.model_name = model_name
        self.store = InferenceStore()
        self.metrics = flywheel_metrics()
        self.memory = CorrectionMemory(memory) if memory.enabled else None
        self.docs = docs  # grounded answers (retrieval:), None when the profile has none
        routing = settings.routing
        self.router = (
            Router(routing, model_name, memory.embedding_model) if routing.enabled else None
        )

    def warm_memory(self) -> None:
        """Load the embedding model in the background, so the first lookup does not wait."""
        if self.memory is not None:
            memory = self.memory
            threading.Thread(target=lambda: memory.embedder, daemon=True).start()

    def close(self) -> None:
        self.store.close()
        if self.memory is not None:
            self.memory.close()

    # -- helpers ---------------------------------------------------------------------------

    def _max_tokens(self, value: int | None, param: str) -> int:
        limit = self.settings.max_new_tokens_limit
        if value is None:
            return self.settings.default_max_new_tokens
        if value > limit:
            raise ApiError(422, f"{param} must be at most {limit}", param=param)
        return value

    def _chosen(self, model: str | None) -> str | None:
        """The served model a request names, or None to let the router (and the canary)
        choose: the registered model's name means the latter. The generator answers 404 for
        a name it does not serve."""
        return None if model in (None, self.model_name) else model

    def _check_prompt(self, text: str, param: str) -> None:
        if len(text) > self.settings.max_prompt_chars:
            raise ApiError(
                413,
                f"{param} is {len(text)} characters; the limit is {self.settings.max_prompt_chars}",
                param=param,
                code="prompt_too_long",
            )

    def announce_version(self) -> None:
        """Read the version about to be served from the registry, so that every response,
        health and metrics included, names it from the start (the generator logs why not)."""
        try:
            _, version = resolve_model_uri(default_model_uri())
        except ModelNotFound:
            return  # the generator says so, in one line
        except Exception as exc:
            log.warning("serving version not known yet: %s", exc)
            return
        self.set_version(version)

    def set_version(self, version: str) -> None:
        """The champion serves `version` (the router learns its domain)."""
        if version and version != CurrentVersion.value:
            if CurrentVersion.value:
                self.metrics.model_version.labels(self.model_name, CurrentVersion.value).set(0)
            CurrentVersion.value = version
            self.metrics.model_version.labels(self.model_name, version).set(1)
        if version and self.router is not None:
            self.router.follow(version)

    async def _generate(self, item: GenerationInput, param: str | None = None) -> GenerationOutput:
        """Generate through the batching generator; `param` names the prompt field in errors."""
        results = await with_connection_retry(
            lambda: self.generator.to_async.generate(inputs=[item])
        )
        out = _as_output(results[0])
        _raise_for(out, param)
        self._answered_by(out)
        self.metrics.response_cache.labels(out.cache).inc()
        return out

    def _answered_by(self, out: GenerationOutput) -> None:
        if out.model == CHAMPION:
            self.set_version(out.model_version)

    async def _recall(self, question: str, use_memory: bool) -> tuple[str, Recall | None]:
        """(x-flywheel-memory value, the entry that answers): the memory is consulted unless
        the request opted out (`x-flywheel-memory: off`) or the profile turned it off."""
        if self.memory is None or not use_memory:
            self.metrics.memory_lookups.labels("off").inc()
            return "off", None
        recall = await anyio.to_thread.run_sync(self.memory.recall, question)
        self.metrics.memory_entries.set(len(self.memory.served()))
        status = "hit" if recall else "miss"
        self.metrics.memory_lookups.labels(status).inc()
        return status, recall

    def _ground(
        self, item: GenerationInput, question: str, asked: Asked
    ) -> tuple[GenerationInput, list[Hit] | None]:
        """The request with the docs' passages for its question in its last user turn, and
        those passages; unchanged (and None) without an index, for raw text, or when the
        request opted out (`x-flywheel-retrieval: off`)."""
        if self.docs is None or not asked.docs or item.messages is None:
            return item, None
        grounded, hits = self.docs.ground(question)
        self.metrics.retrieval_passages.observe(len(hits))
        messages = [dict(m) for m in item.messages]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last_user]["content"] = grounded
        return item.model_copy(update={"messages": messages}), hits

    async def _route(self, question: str) -> tuple[str, float | None]:
        """(x-flywheel-route, the similarity): for a question outside the champion's domain
        `scope` (the scope reply) or the name of the model the profile sends those to, else
        `champion`; `off` when routing is off or the domain is not known yet."""
        if self.router is None:
            return "off", None
        verdict = await anyio.to_thread.run_sync(self.router.judge, question)
        if verdict is None:
            route, similarity = "off", None
        else:
            away = self.settings.routing.out_of_domain
            route = CHAMPION if verdict.in_domain else "scope" if away == "scope_reply" else away
            similarity = verdict.similarity
        self.metrics.routes.labels(route).inc()
        return route, similarity

    async def _plan(self, item: GenerationInput, question: str, asked: Asked) -> Plan:
        """A correction from the memory first; then, unless the request named its model, the
        router: outside the champion's domain the scope reply or the model it sends those to;
        then the model, grounded in the docs when retrieval is on."""
        memory, recall = await self._recall(question, asked.memory)
        if recall is not None:
            return Plan(item, memory, recall, fixed=recall.entry.answer)
        route, similarity = ("off", None) if item.model else await self._route(question)
        if route == "scope":
            return Plan(
                item, memory, None, route, similarity, fixed=self.settings.routing.scope_reply
            )
        if route not in (CHAMPION, "off"):
            item = item.model_copy(update={"model": route, "routed": True})
        grounded, hits = self._ground(item, question, asked)
        return Plan(grounded, memory, None, route, similarity, hits)

    async def _answer(self, plan: Plan, param: str | None = None) -> GenerationOutput:
        """The plan's fixed answer with the model's token counts, else the model's answer."""
        with tracer().start_as_current_span("flywheel.answer") as span:
            span.set_attribute("flywheel.memory", plan.memory)
            span.set_attribute("flywheel.route", plan.route)
            if plan.fixed is None:
                out = await self._generate(plan.item, param)
            else:
                out = await self._counted(plan.item, plan.fixed)
                _raise_for(out, param)
            span.set_attribute("flywheel.cache", out.cache)
            return out

    async def _counted(self, item: GenerationInput, answer: str) -> GenerationOutput:
        """A fixed answer (a correction, the scope reply) as an output, with the served
        model's token counts."""
        out = await with_connection_retry(
            lambda: self.generator.to_async.count_tokens(item=item, answer=answer)
        )
        return _as_output(out)

    def _record(
        self,
        endpoint: str,
        prompt: str,
        out: GenerationOutput,
        started: float,
        request_id: str,
        plan: Plan,
    ) -> float:
        latency_ms = round((time.perf_counter() - started) * 1000, 1)
        stored = {
            "full": lambda: prompt,
            "off": lambda: "",
            "redacted": lambda: scrub_pii(prompt, Counter()),
        }[self.settings.log_prompts]()
        self.store.log(
            InferenceRecord(
                request_id=request_id,
                created_at=time.time(),
                model_version=out.model_version,
                endpoint=endpoint,
                prompt=stored,
                response=out.text,
                prompt_tokens=out.prompt_tokens,
                completion_tokens=out.completion_tokens,
                latency_ms=latency_ms,
                confidence=out.confidence,
                memory_entry=plan.recall.entry.id if plan.recall else None,
                trace_id=current_trace_id(),
                route=plan.route,
                route_similarity=plan.similarity,
            )
        )
        self.metrics.generated_tokens.labels(out.model_version, endpoint).inc(out.completion_tokens)
        self.metrics.prompt_tokens.labels(out.model_version, endpoint).inc(out.prompt_tokens)
        self.metrics.answers.labels(out.model, out.model_version).inc()
        return latency_ms

    # -- routes ----------------------------------------------------------------------------

    async def generate(self, req: GenerateRequest, asked: Asked = Asked()) -> JSONResponse:
        started = time.perf_counter()
        self._check_prompt(req.prompt, "prompt")
        item = GenerationInput(
            messages=[{"role": "user", "content": req.prompt}],
            max_new_tokens=self._max_tokens(req.max_new_tokens, "max_new_tokens"),
            temperature=req.temperature,
            top_p=req.top_p,
            stop=req.stop,
            model=self._chosen(req.model),
            user=req.user,
        )
        plan = await self._plan(item, req.prompt, asked)
        out = await self._answer(plan, param="prompt")
        request_id = f"gen-{uuid.uuid4().hex}"
        latency = self._record("generate", req.prompt, out, started, request_id, plan)
        reply = GenerateResponse(
            text=out.text,
            request_id=request_id,
            model_version=out.model_version,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            latency_ms=latency,
        )
        return JSONResponse({**reply.model_dump(), **plan.sources()}, headers=plan.headers(out))

    async def chat_completions(
        self, req: ChatCompletionRequest, asked: Asked = Asked()
    ) -> JSONResponse | StreamingResponse:
        started = time.perf_counter()
        messages = [m.model_dump() for m in req.messages]
        prompt = "\n".join(m["content"] for m in messages)
        self._check_prompt(prompt, "messages")
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        limit = self._max_tokens(req.max_completion_tokens or req.max_tokens, param)
        item = GenerationInput(
            messages=messages,
            max_new_tokens=limit,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=req.stop,
            model=self._chosen(req.model),
            user=req.user,
        )
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        users = [m["content"] for m in messages if m["role"] == "user"]
        question = users[-1] if users else prompt
        return await self._complete(
            "chat", item, prompt, question, request_id, started, limit, req, asked
        )

    async def completions(
        self, req: CompletionRequest, asked: Asked = Asked()
    ) -> JSONResponse | StreamingResponse:
        started = time.perf_counter()
        self._check_prompt(req.prompt, "prompt")
        limit = self._max_tokens(req.max_tokens, "max_tokens")
        item = GenerationInput(
            text=req.prompt,
            max_new_tokens=limit,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=req.stop,
            model=self._chosen(req.model),
            user=req.user,
        )
        request_id = f"cmpl-{uuid.uuid4().hex}"
        return await self._complete(
            "completion",
            item,
            req.prompt,
            req.prompt,
            request_id,
            started,
            limit,
            req,
            asked,
        )

    async def _complete(
        self,
        kind: str,
        item: GenerationInput,
        prompt: str,
        question: str,
        request_id: str,
        started: float,
        limit: int,
        req: OpenAIBody,
        asked: Asked,
    ) -> JSONResponse | StreamingResponse:
        """An OpenAI completion (chat or text), from the memory or the model, whole or streamed."""
        plan = await self._plan(item, question, asked)
        if req.stream:
            return await self._stream(kind, plan, prompt, request_id, started, limit, req)
        out = await self._answer(plan)
        self._record(kind, prompt, out, started, request_id, plan)
        build = chat_completion if kind == "chat" else text_completion
        model = req.model or self.model_name
        reply = build(request_id, model, out.text, out.prompt_tokens, out.completion_tokens, limit)
        if plan.fixed is not None:  # a correction is a whole answer, whatever its length
            reply.choices[0].finish_reason = "stop"
        return JSONResponse({**wire(reply), **plan.sources()}, headers=plan.headers(out))

    async def _stream_outputs(self, item: GenerationInput) -> AsyncIterator[GenerationOutput]:
        buffer = ""
        async for chunk in self.generator.to_async.stream(item=item):
            buffer += chunk if isinstance(chunk, str) else chunk.decode()
            while "\n" in buffer:
                line, buffer = buffer.split("\n", 1)
                if line.strip():
                    yield GenerationOutput.model_validate_json(line)

    async def _fixed_outputs(
        self, item: GenerationInput, answer: str
    ) -> AsyncIterator[GenerationOutput]:
        """A fixed answer (a correction, the scope reply) as a stream: the whole answer, then
        its token counts."""
        counted = await self._counted(item, answer)
        if counted.error:
            yield counted
            return
        yield counted.model_copy(update={"prompt_tokens": 0, "completion_tokens": 0})
        yield counted.model_copy(update={"text": ""})

    async def _stream(
        self,
        kind: str,
        plan: Plan,
        prompt: str,
        request_id: str,
        started: float,
        limit: int,
        req: OpenAIBody,
    ) -> StreamingResponse:
        """A stream of the answer; its first chunk carries the sources when grounded."""
        outputs = (
            self._stream_outputs(plan.item)
            if plan.fixed is None
            else self._fixed_outputs(plan.item, plan.fixed)
        )
        first = await anext(outputs)
        _raise_for(first)  # fail before any byte is sent, as a normal 4xx
        self.metrics.time_to_first_token.labels(kind).observe(time.perf_counter() - started)
        self._answered_by(first)
        if plan.fixed is None:
            self.metrics.response_cache.labels(first.cache).inc()
        created = int(time.time())
        model = req.model or self.model_name

        def event(text: str, finish: Any = None, role: bool = False) -> str:
            if kind == "chat":
                if finish is not None:
                    delta = ChoiceDelta()
                elif role:
                    delta = ChoiceDelta(role="assistant", content=text)
                else:
                    delta = ChoiceDelta(content=text)
                return sse(chat_chunk(request_id, model, created, delta, finish))
            return sse(completion_chunk(request_id, model, created, text, finish))

        def opening(text: str) -> str:
            if plan.hits is None:
                return event(text, role=True)
            chunk = chat_chunk(
                request_id, model, created, ChoiceDelta(role="assistant", content=text)
            )
            return sse(json.dumps({**wire(chunk), **plan.sources()}))

        async def events() -> AsyncIterator[str]:
            text, last = first.text, first
            yield opening(first.text)
            async for out in outputs:
                if out.error:  # the generation failed after the stream began: end it cleanly
                    log.warning("stream %s failed: %s", request_id, out.error)
                    break
                if out.text:
                    text += out.text
                    yield event(out.text)
                last = out
            finish = "stop" if plan.fixed else finish_reason(last.completion_tokens, limit)
            yield event("", finish=finish)
            if req.include_usage:
                counts = (last.prompt_tokens, last.completion_tokens)
                yield sse(usage_chunk(kind, request_id, model, created, *counts))
            yield sse("[DONE]")
            final = GenerationOutput(
                text=text,
                prompt_tokens=last.prompt_tokens,
                completion_tokens=last.completion_tokens,
                model_version=first.model_version,
                model=first.model,
            )
            self._record(kind, prompt, final, started, request_id, plan)

        headers = {"x-request-id": request_id, **plan.headers(first)}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    async def _served(self) -> list[dict[str, Any]]:
        """The generator's models (name, version, engine, memory, or why not ready)."""
        rows = await with_connection_retry(lambda: self.generator.to_async.models())
        return [dict(row) for row in rows]

    async def models(self) -> dict[str, Any]:
        """The registered model's name (the router and the canary choose), then each served
        model by its name; a request's `model` may be any of them."""
        cards = [model_card(self.model_name, CurrentVersion.value)]
        for row in await self._served():
            extra = {k: row[k] for k in ("ready", "engine", "memory_gb", "error") if k in row}
            cards.append(model_card(row["name"], row.get("version", ""), **extra))
        return {"object": "list", "data": [wire(card) for card in cards]}

    async def model(self, model_id: str) -> dict[str, Any]:
        for card in (await self.models())["data"]:
            if card["id"] == model_id:
                return dict(card)
        raise ApiError(
            404,
            f"model '{model_id}' is not served here; GET /v1/models lists them",
            param="model",
            code="model_not_found",
        )

    async def feedback(self, req: FeedbackRequest, client: str = "") -> FeedbackResponse:
        def store_it() -> tuple[Any, bool, InferenceRecord | None]:
            record, created = self.store.add_feedback(
                req.request_id, req.rating, req.correction, req.comment
            )
            return record, created, self.store.get(req.request_id) if created else None

        try:  # off the event loop: the store may wait for its writer
            record, created, served = await anyio.to_thread.run_sync(store_it)
        except UnknownRequest:
            raise ApiError(
                404, f"unknown request_id '{req.request_id}'", param="request_id", code="not_found"
            ) from None
        except StoreBusy as exc:
            raise ApiError(503, str(exc), code="store_busy") from None
        memory = None
        if created and served is not None:
            self.metrics.feedback.labels(req.rating, served.model_version).inc()
            if req.correction:
                memory = await anyio.to_thread.run_sync(
                    self._remember, served, req.correction, client
                )
        return FeedbackResponse(
            request_id=record.request_id, rating=record.rating, stored=created, memory=memory
        )

    def _remember(self, served: InferenceRecord, correction: str, client: str) -> str:
        """Offer a user's correction to the memory; says what became of it."""
        if self.memory is None:
            return "off: the memory is disabled"
        if self.memory.config.trust != "feedback":
            return "not served: the memory trusts reviewed corrections only (memory.trust)"
        if not served.prompt:
            return "not kept: the question was not logged (serve.log_prompts is off)"
        try:
            entry = self.memory.remember(
                served.prompt,
                correction,
                "feedback",
                served.request_id,
                served.model_version,
                client,
            )
        except CorrectionRejected as exc:
            return f"not kept: {exc}"
        return f"kept as {entry.id}"

    def memory_entries(self) -> dict[str, Any]:
        if self.memory is None:
            return {"enabled": False, "served": [], "entries": []}
        served = {e.id for e in self.memory.served()}
        entries = [{**e.to_dict(), "served": e.id in served} for e in self.memory.entries()]
        return {"enabled": True, "trust": self.memory.config.trust, "entries": entries}

    def forget(self, entry_id: str) -> dict[str, Any]:
        if self.memory is None or not self.memory.set_status(entry_id, "deleted"):
            raise ApiError(404, f"no memory entry '{entry_id}'", param="entry_id", code="not_found")
        return {"id": entry_id, "status": "deleted"}

    async def reload(self, req: ReloadRequest) -> dict[str, Any]:
        try:
            info = await self.generator.to_async.reload(model_uri=req.model_uri, model=req.model)
        except Exception as exc:
            raise ApiError(
                422,
                f"cannot load {req.model_uri} as {req.model}: {exc}",
                param="model_uri",
                code="model_load_failed",
            ) from None
        if req.model == CHAMPION:
            self.set_version(str(info["version"]))
        return dict(info)

    async def unload(self, model: str) -> dict[str, Any]:
        if model == CHAMPION:
            raise ApiError(
                400, "the champion is swapped (POST /admin/reload), not unloaded", param="model"
            )
        if model not in {row["name"] for row in await self._served()}:
            raise ApiError(404, f"no model '{model}' is served", param="model", code="not_found")
        return dict(await self.generator.to_async.unload(model=model))
