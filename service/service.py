"""Flywheel's BentoML service.

Two services, served together by `bentoml serve` (see bentofile.yaml):
- `Generator` holds the model. Its `generate` API is batchable: concurrent requests from the
  gateway are grouped by BentoML's adaptive batcher into one batched `generate` call.
- `Flywheel` is the public API (port 3000): /generate, the OpenAI-compatible /v1 routes,
  /feedback, the playground page, admin actions. FastAPI validates every body; the gateway
  logs every generation and feedback and exports `flywheel_*` metrics on /metrics.

Batch size, latency budget, concurrency and timeouts come from the profile's `serve:` section
(`FLYWHEEL_PROFILE`, default cpu-small, with `FLYWHEEL_SET` overrides); the model from
`FLYWHEEL_MODEL_URI` (default: the profile's registered model at alias `champion`).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Annotated, Literal

import bentoml

# BentoML's batching resolves its lazy types (PIL.Image among them) on a worker's first batch;
# imported here, before the model loads in another thread, a request that arrives during the
# load never meets a half-imported module (a 500 after the generator restarts).
import PIL.Image  # noqa: F401
from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from components.retrieval.index import profile_index
from components.serving.fleet import ModelSet
from components.serving.loading import serving_profile
from components.serving.protocol import GenerationInput, GenerationOutput
from service.api import (
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
    FeedbackResponse,
    GenerateRequest,
    GenerateResponse,
    ReloadRequest,
)
from service.auth import ClientAuth, admin_auth, client_id
from service.edge import ServiceEdge, drain_on_sigterm, install_error_handlers, json_bodies_only
from service.plan import Asked
from service.routes import Gateway
from service.tracing import tracer, tracing_options

PROFILE = serving_profile()  # the decorators below need the limits when the class is defined
SETTINGS = PROFILE.serve
# Latency buckets 40% apart from 50 ms to 5 min: BentoML's default jumps from 10 s to 30 s,
# where most LLM requests fall, and the monitor's quantiles interpolate inside a bucket.
LATENCY_BUCKETS = {"min": 0.05, "max": 300.0, "factor": 1.4}
# OTLP export when the profile's `serve.tracing` is on (see service/tracing.py).
TRACING = tracing_options(SETTINGS.tracing)


# The reference runs one model call at a time; on the engine every request waits in its own
# thread while the engine's loop serves them all (BentoML runs sync APIs on `threads` threads).
ENGINE_THREADS = SETTINGS.max_concurrency if SETTINGS.engine.name == "openvino" else 1


# BentoML renews the gateway's connection session to the generator every 100 requests or
# 5 minutes by closing the old one, even with requests in flight on it: under load those fail
# ("Connector is closed") or lose their answer until the timeout. One session for good.
KEEP_SESSION = {"max_requests": 2**31 - 1, "max_age": 10.0**9}


@bentoml.service(
    name="flywheel-generator",
    workers=1,
    threads=ENGINE_THREADS,
    traffic={"timeout": SETTINGS.request_timeout_s},
    runner_connection=KEEP_SESSION,
    tracing=TRACING,
)
class Generator:
    """The models (champion, canary, and the profile's others): batched generation,
    streaming, hot swap and unloading per name."""

    def __init__(self) -> None:
        # Loaded in the background: /readyz answers 503 at once until the champion is in.
        self.fleet = ModelSet.load_in_background(PROFILE, SETTINGS.warmup)

    def __is_ready__(self) -> bool:
        return self.fleet.ready

    # Adaptive batching groups requests for the reference runtime's static batches; the
    # OpenVINO engine batches by itself, step by step, so each request goes straight in.
    @bentoml.api(
        batchable=SETTINGS.batching and SETTINGS.engine.name == "transformers",
        max_batch_size=SETTINGS.max_batch_size,
        max_latency_ms=SETTINGS.max_latency_ms,
    )
    def generate(self, inputs: list[GenerationInput]) -> list[GenerationOutput]:
        with tracer().start_as_current_span("flywheel.batch") as span:
            span.set_attribute("flywheel.batch_size", len(inputs))
            return self.fleet.generate(inputs)

    @bentoml.api
    async def stream(self, item: GenerationInput) -> AsyncGenerator[str, None]:
        import anyio

        pieces = self.fleet.stream(item)
        try:
            while (output := await anyio.to_thread.run_sync(next, pieces, None)) is not None:
                yield output.model_dump_json() + "\n"
        finally:
            pieces.close()  # a client that went away stops its generation

    @bentoml.api
    def count_tokens(self, item: GenerationInput, answer: str) -> GenerationOutput:
        return self.fleet.count_tokens(item, answer)

    @bentoml.api
    def reload(self, model_uri: str, model: str = "champion") -> dict:
        loaded = self.fleet.load(model, model_uri)
        return {"model": model, "name": loaded.name, "version": loaded.version}

    @bentoml.api
    def unload(self, model: str) -> dict:
        self.fleet.unload(model)
        return {"model": model, "unloaded": True}

    @bentoml.api
    def models(self) -> list[dict]:
        return self.fleet.listing()


@functools.cache
def playground_html() -> str:
    """The playground page: a prompt box, a streamed answer, thumbs up/down, a correction."""
    return (Path(__file__).parent / "playground.html").read_text(encoding="utf-8")


app = FastAPI(
    title="Flywheel",
    description="Generation, OpenAI-compatible API and feedback.",
    dependencies=[Depends(json_bodies_only)],
)
install_error_handlers(app)
CLIENT = [Depends(ClientAuth(SETTINGS.trusted_proxies))]
ADMIN = [Depends(admin_auth)]
# `x-flywheel-memory: off` asks for the model's own answer; the response says hit, miss or off.
MemoryChoice = Annotated[Literal["on", "off"] | None, Header(alias="x-flywheel-memory")]
# `x-flywheel-retrieval: off` asks without the docs' passages (when the profile grounds answers).
RetrievalChoice = Annotated[Literal["on", "off"] | None, Header(alias="x-flywheel-retrieval")]


@bentoml.service(
    name="flywheel",
    traffic={"timeout": SETTINGS.request_timeout_s},
    metrics={"enabled": True, "duration": LATENCY_BUCKETS},
    tracing=TRACING,
)
@bentoml.asgi_app(app, path="/")
class Flywheel:
    """The public API; generation goes through the batching generator."""

    generator = bentoml.depends(Generator)

    def __init__(self) -> None:
        docs = profile_index(PROFILE) if PROFILE.retrieval.enabled else None
        self.gateway = Gateway(
            SETTINGS,
            self.generator,
            PROFILE.registry.model_name,
            PROFILE.memory,
            docs,
        )
        self.gateway.models.announce_version(PROFILE)
        self.gateway.warm_memory()
        drain_on_sigterm()

    @bentoml.on_shutdown
    def _close(self) -> None:
        self.gateway.close()  # drains the inference log

    @app.get("/", include_in_schema=False)
    def playground(self) -> HTMLResponse:
        return HTMLResponse(playground_html())

    # Each route's name is its `endpoint` label in the project's metrics.
    @app.post("/generate", dependencies=CLIENT, response_model=GenerateResponse, name="generate")
    async def generate(
        self, body: GenerateRequest, memory: MemoryChoice = None, docs: RetrievalChoice = None
    ) -> JSONResponse:
        return await self.gateway.generate(body, Asked(memory != "off", docs != "off"))

    @app.post("/v1/chat/completions", dependencies=CLIENT, response_model=None, name="chat")
    async def chat_completions(
        self, body: ChatCompletionRequest, memory: MemoryChoice = None, docs: RetrievalChoice = None
    ) -> JSONResponse | StreamingResponse:
        return await self.gateway.chat_completions(body, Asked(memory != "off", docs != "off"))

    @app.post("/v1/completions", dependencies=CLIENT, response_model=None, name="completion")
    async def completions(
        self, body: CompletionRequest, memory: MemoryChoice = None
    ) -> JSONResponse | StreamingResponse:
        return await self.gateway.completions(body, Asked(memory=memory != "off"))

    @app.get("/v1/models", dependencies=CLIENT)
    async def models(self) -> dict:
        return await self.gateway.models.listing()

    @app.get("/v1/models/{model_id:path}", dependencies=CLIENT)
    async def model(self, model_id: str) -> dict:
        return await self.gateway.models.model(model_id)

    @app.post("/feedback", dependencies=CLIENT)
    async def feedback(self, body: FeedbackRequest, request: Request) -> FeedbackResponse:
        return await self.gateway.feedback.submit(body, client=client_id(request))

    @app.post("/admin/reload", dependencies=ADMIN, name="reload")
    async def reload(self, body: ReloadRequest) -> dict:
        return await self.gateway.models.reload(body)

    @app.delete("/admin/models/{model}", dependencies=ADMIN)
    async def unload(self, model: str) -> dict:
        return await self.gateway.models.unload(model)

    @app.get("/admin/memory", dependencies=ADMIN)
    def memory_entries(self) -> dict:
        return self.gateway.feedback.memory_entries()

    @app.delete("/admin/memory/{entry_id}", dependencies=ADMIN)
    def forget(self, entry_id: str) -> dict:
        return self.gateway.feedback.forget(entry_id)


# On the service, not the mounted app, so BentoML's own routes (/metrics, /healthz) carry it too.
# (`@bentoml.service` returns a Service object; its type stub still says the class.)
Flywheel.add_asgi_middleware(ServiceEdge, max_concurrency=SETTINGS.max_concurrency)  # type: ignore[attr-defined]
