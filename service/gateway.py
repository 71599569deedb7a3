"""Request handling behind the public routes: validate, generate, log, count.

Every client mistake becomes a 4xx with an OpenAI-style JSON error naming the field; nothing
a client sends is allowed to surface as a 500.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from components.config import ServeConfig
from components.inference_store import InferenceRecord, InferenceStore, UnknownRequest
from components.serving.api import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
    GenerateRequest,
    chat_chunk,
    chat_completion,
    completion_chunk,
    finish_reason,
    sse,
    text_completion,
)
from components.serving.model import GenerationInput, GenerationOutput, serving_profile
from components.text import scrub_pii

log = logging.getLogger("flywheel.service")


@functools.cache
def playground_html() -> str:
    """The playground page: a prompt box, a streamed answer, thumbs up/down, a correction."""
    from pathlib import Path

    return (Path(__file__).parent / "playground.html").read_text(encoding="utf-8")


class CurrentVersion:
    """The served model version, shared with the header middleware of this process."""

    value = ""


class ModelVersionHeader:
    """ASGI middleware: every HTTP response carries `x-model-version`."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-model-version", CurrentVersion.value.encode() or b"none"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_header)


def install_error_handlers(app: FastAPI) -> None:
    """Client errors as JSON; unexpected ones as a JSON 500 with the details in the log."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        status = getattr(exc, "error_code", None)
        if int(status or 500) == 503:  # BentoML: the generator's queue or latency budget is full
            return JSONResponse(
                ApiError(503, "the model is busy; retry shortly", code="overloaded").body(),
                status_code=503,
            )
        log.exception("unexpected error")
        return JSONResponse(
            ApiError(500, "internal error", code="server_error").body(), status_code=500
        )


@dataclass(frozen=True)
class Metrics:
    generated_tokens: Any
    prompt_tokens: Any
    time_to_first_token: Any
    feedback: Any
    model_version: Any
    client_errors: Any


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
    )


async def parse(request: Request, model: type[BaseModel]) -> Any:
    """The body as `model`, or an ApiError naming what is wrong with it."""
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(
            400, f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(422, f"{param}: {first['msg']}", param=param) from None


async def with_connection_retry(call: Any, attempts: int = 3) -> Any:
    """Retry a generator call whose pooled connection the generator had already closed.

    Under load the generator's server can close an idle keep-alive connection just as the
    gateway reuses it ("Server disconnected"); the request never reached the model, so
    sending it again on a fresh connection is safe.
    """
    import asyncio

    import aiohttp

    for attempt in range(attempts):
        try:
            return await call()
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            if attempt == attempts - 1:
                raise
            log.warning("generator connection closed under us; retrying (%d)", attempt + 1)
            await asyncio.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


class Gateway:
    """What the public routes do, given the generator dependency."""

    def __init__(self, settings: ServeConfig, generator: Any) -> None:
        self.settings = settings
        self.generator = generator
        self.store = InferenceStore()
        self.metrics = flywheel_metrics()
        self.model_name = serving_profile().registry.model_name
        self.api_key = os.environ.get("FLYWHEEL_API_KEY") or None

    def close(self) -> None:
        self.store.close()

    # -- helpers ---------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if not secrets.compare_digest(token, self.api_key):
            raise ApiError(
                401,
                "missing or wrong API key (Authorization: Bearer <key>)",
                code="invalid_api_key",
            )

    def _max_tokens(self, value: int | None, param: str) -> int:
        limit = self.settings.max_new_tokens_limit
        if value is None:
            return self.settings.default_max_new_tokens
        if value > limit:
            raise ApiError(422, f"{param} must be at most {limit}", param=param)
        return value

    def _check_model(self, model: str | None) -> None:
        if model and model not in (self.model_name, f"{self.model_name}:{CurrentVersion.value}"):
            raise ApiError(
                404,
                f"model '{model}' is not served here; GET /v1/models lists '{self.model_name}'",
                param="model",
                code="model_not_found",
            )

    def _check_prompt(self, text: str, param: str) -> None:
        if len(text) > self.settings.max_prompt_chars:
            raise ApiError(
                413,
                f"{param} is {len(text)} characters; the limit is {self.settings.max_prompt_chars}",
                param=param,
                code="prompt_too_long",
            )

    def _set_version(self, version: str) -> None:
        if version and version != CurrentVersion.value:
            if CurrentVersion.value:
                self.metrics.model_version.labels(self.model_name, CurrentVersion.value).set(0)
            CurrentVersion.value = version
            self.metrics.model_version.labels(self.model_name, version).set(1)

    async def _ensure_version(self) -> None:
        if not CurrentVersion.value:
            info = await self.generator.to_async.info()
            self._set_version(str(info["version"]))

    async def _generate(self, item: GenerationInput, param: str | None = None) -> GenerationOutput:
        """Generate through the batching generator; `param` names the prompt field in errors."""
        results = await with_connection_retry(
            lambda: self.generator.to_async.generate(inputs=[item])
        )
        out = results[0]
        out = out if isinstance(out, GenerationOutput) else GenerationOutput.model_validate(out)
        if out.error:
            raise ApiError(
                400, out.error, param=param or out.error_param, code="context_length_exceeded"
            )
        self._set_version(out.model_version)
        return out

    def _record(
        self, endpoint: str, prompt: str, out: GenerationOutput, started: float, request_id: str
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
            )
        )
        self.metrics.generated_tokens.labels(out.model_version, endpoint).inc(out.completion_tokens)
        self.metrics.prompt_tokens.labels(out.model_version, endpoint).inc(out.prompt_tokens)
        return latency_ms

    async def _guard(self, endpoint: str, request: Request, handler: Any) -> Any:
        try:
            self._authorize(request)
            await self._ensure_version()
            return await handler()
        except ApiError as exc:
            self.metrics.client_errors.labels(endpoint, str(exc.status)).inc()
            raise

    # -- routes ----------------------------------------------------------------------------

    async def generate(self, request: Request) -> JSONResponse:
        async def handle() -> JSONResponse:
            started = time.perf_counter()
            req = await parse(request, GenerateRequest)
            self._check_prompt(req.prompt, "prompt")
            item = GenerationInput(
                messages=[{"role": "user", "content": req.prompt}],
                max_new_tokens=self._max_tokens(req.max_new_tokens, "max_new_tokens"),
                temperature=req.temperature,
                top_p=req.top_p,
                stop=req.stop,
            )
            out = await self._generate(item, param="prompt")
            request_id = f"gen-{uuid.uuid4().hex}"
            latency = self._record("generate", req.prompt, out, started, request_id)
            return JSONResponse(
                {
                    "text": out.text,
                    "request_id": request_id,
                    "model_version": out.model_version,
                    "prompt_tokens": out.prompt_tokens,
                    "completion_tokens": out.completion_tokens,
                    "latency_ms": latency,
                }
            )

        return await self._guard("generate", request, handle)

    async def chat_completions(self, request: Request) -> JSONResponse | StreamingResponse:
        async def handle() -> JSONResponse | StreamingResponse:
            started = time.perf_counter()
            req = await parse(request, ChatCompletionRequest)
            self._check_model(req.model)
            messages = [m.model_dump() for m in req.messages]
            prompt = "\n".join(m["content"] for m in messages)
            self._check_prompt(prompt, "messages")
            limit = self._max_tokens(
                req.max_completion_tokens or req.max_tokens,
                "max_completion_tokens" if req.max_completion_tokens else "max_tokens",
            )
            item = GenerationInput(
                messages=messages,
                max_new_tokens=limit,
                temperature=req.temperature,
                top_p=req.top_p,
                stop=req.stop,
            )
            request_id = f"chatcmpl-{uuid.uuid4().hex}"
            if req.stream:
                return await self._stream("chat", item, prompt, request_id, started, limit)
            out = await self._generate(item)
            self._record("chat", prompt, out, started, request_id)
            return JSONResponse(
                chat_completion(
                    request_id,
                    self.model_name,
                    out.text,
                    out.prompt_tokens,
                    out.completion_tokens,
                    limit,
                )
            )

        return await self._guard("chat", request, handle)

    async def completions(self, request: Request) -> JSONResponse | StreamingResponse:
        async def handle() -> JSONResponse | StreamingResponse:
            started = time.perf_counter()
            req = await parse(request, CompletionRequest)
            self._check_model(req.model)
            self._check_prompt(req.prompt, "prompt")
            limit = self._max_tokens(req.max_tokens, "max_tokens")
            item = GenerationInput(
                text=req.prompt,
                max_new_tokens=limit,
                temperature=req.temperature,
                top_p=req.top_p,
                stop=req.stop,
            )
            request_id = f"cmpl-{uuid.uuid4().hex}"
            if req.stream:
                return await self._stream(
                    "completion", item, req.prompt, request_id, started, limit
                )
            out = await self._generate(item)
            self._record("completion", req.prompt, out, started, request_id)
            return JSONResponse(
                text_completion(
                    request_id,
                    self.model_name,
                    out.text,
                    out.prompt_tokens,
                    out.completion_tokens,
                    limit,
                )
            )

        return await self._guard("completion", request, handle)

    async def _stream_outputs(self, item: GenerationInput) -> AsyncIterator[GenerationOutput]:
        buffer = ""
        async for chunk in self.generator.to_async.stream(item=item):
            buffer += chunk if isinstance(chunk, str) else chunk.decode()
            while "\n" in buffer:
                line, buffer = buffer.split("\n", 1)
                if line.strip():
                    yield GenerationOutput.model_validate_json(line)

    async def _stream(
        self,
        kind: str,
        item: GenerationInput,
        prompt: str,
        request_id: str,
        started: float,
        limit: int,
    ) -> StreamingResponse:
        outputs = self._stream_outputs(item)
        first = await anext(outputs)
        if first.error:  # fail before any byte is sent, as a normal 4xx
            raise ApiError(
                400, first.error, param=first.error_param, code="context_length_exceeded"
            )
        self.metrics.time_to_first_token.labels(kind).observe(time.perf_counter() - started)
        self._set_version(first.model_version)
        created = int(time.time())

        def chunk(text: str, finish: str | None = None, role: bool = False) -> str:
            if kind == "chat":
                delta = (
                    {"role": "assistant", "content": text}
                    if role
                    else ({"content": text} if finish is None else {})
                )
                return sse(chat_chunk(request_id, self.model_name, created, delta, finish))
            return sse(completion_chunk(request_id, self.model_name, created, text, finish))

        async def events() -> AsyncIterator[str]:
            text = first.text
            yield chunk(first.text, role=True)
            last = first
            async for out in outputs:
                if out.text:
                    text += out.text
                    yield chunk(out.text)
                last = out
            final = GenerationOutput(
                text=text,
                prompt_tokens=last.prompt_tokens,
                completion_tokens=last.completion_tokens,
                model_version=first.model_version,
            )
            yield chunk("", finish=finish_reason(final.completion_tokens, limit))
            yield sse("[DONE]")
            self._record(kind, prompt, final, started, request_id)

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"x-request-id": request_id}
        )

    async def models(self, request: Request) -> JSONResponse:
        async def handle() -> JSONResponse:
            return JSONResponse(
                {
                    "object": "list",
                    "data": [
                        {
                            "id": self.model_name,
                            "object": "model",
                            "created": 0,
                            "owned_by": "flywheel",
                            "version": CurrentVersion.value,
                        }
                    ],
                }
            )

        return await self._guard("models", request, handle)

    async def feedback(self, request: Request) -> JSONResponse:
        async def handle() -> JSONResponse:
            import anyio

            req = await parse(request, FeedbackRequest)
            try:
                record, created = await anyio.to_thread.run_sync(
                    self.store.add_feedback, req.request_id, req.rating, req.correction, req.comment
                )
            except UnknownRequest:
                raise ApiError(
                    404,
                    f"unknown request_id '{req.request_id}'",
                    param="request_id",
                    code="not_found",
                ) from None
            if created:
                served = self.store.get(req.request_id)
                self.metrics.feedback.labels(
                    req.rating, served.model_version if served else "unknown"
                ).inc()
            return JSONResponse(
                {"request_id": record.request_id, "rating": record.rating, "stored": created}
            )

        return await self._guard("feedback", request, handle)

    async def reload(self, request: Request) -> JSONResponse:
        class Reload(BaseModel):
            model_uri: str

        async def handle() -> JSONResponse:
            req = await parse(request, Reload)
            try:
                info = await self.generator.to_async.reload(model_uri=req.model_uri)
            except Exception as exc:
                raise ApiError(
                    422,
                    f"cannot load {req.model_uri}: {exc}",
                    param="model_uri",
                    code="model_load_failed",
                ) from None
            self._set_version(str(info["version"]))
            return JSONResponse(info)

        return await self._guard("reload", request, handle)
