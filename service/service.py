"""Flywheel's BentoML service.

Two services, served together by `bentoml serve` (see bentofile.yaml):
- `Generator` holds the model. Its `generate` API is batchable: concurrent requests from the
  gateway are grouped by BentoML's adaptive batcher into one batched `generate` call.
- `Flywheel` is the public API (port 3000): /generate, the OpenAI-compatible /v1 routes,
  /feedback, the playground page. It validates input, logs every generation and feedback,
  and exports `flywheel_*` metrics beside BentoML's own on /metrics.

Batch size, latency budget, concurrency and timeouts come from the profile's `serve:` section
(`FLYWHEEL_PROFILE`, default cpu-small); the model from `FLYWHEEL_MODEL_URI` (default: the
profile's registered model at alias `champion`).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import bentoml
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from components.serving.model import GenerationInput, GenerationOutput, serve_settings
from service.gateway import Gateway, ModelVersionHeader, install_error_handlers, playground_html

SETTINGS = serve_settings()  # the decorators below need the limits when the class is defined


@bentoml.service(
    name="flywheel-generator", workers=1, traffic={"timeout": SETTINGS.request_timeout_s}
)
class Generator:
    """The model: batched generation, streaming, and hot swap to another version."""

    def __init__(self) -> None:
        from components.serving.model import ServedModel, default_model_uri

        self.served = ServedModel.from_uri(default_model_uri(), warmup=SETTINGS.warmup)

    @bentoml.api(
        batchable=SETTINGS.batching,
        max_batch_size=SETTINGS.max_batch_size,
        max_latency_ms=SETTINGS.max_latency_ms,
    )
    def generate(self, inputs: list[GenerationInput]) -> list[GenerationOutput]:
        return self.served.generate(inputs)

    @bentoml.api
    async def stream(self, item: GenerationInput) -> AsyncGenerator[str, None]:
        import anyio

        from components.serving.model import stream_input

        pieces = stream_input(self.served.current, item)
        while (output := await anyio.to_thread.run_sync(next, pieces, None)) is not None:
            yield output.model_dump_json() + "\n"

    @bentoml.api
    def info(self) -> dict:
        current = self.served.current
        return {
            "name": current.name,
            "version": current.version,
            "context_length": current.context_length,
        }

    @bentoml.api
    def reload(self, model_uri: str) -> dict:
        loaded = self.served.swap(model_uri)
        return {"name": loaded.name, "version": loaded.version}


app = FastAPI(title="Flywheel", description="Generation, OpenAI-compatible API and feedback.")
install_error_handlers(app)


# Latency buckets 40% apart from 50 ms to 5 min: BentoML's default jumps from 10 s to 30 s,
# where most LLM requests fall, and the monitor's quantiles interpolate inside a bucket.
LATENCY_BUCKETS = {"min": 0.05, "max": 300.0, "factor": 1.4}


@bentoml.service(
    name="flywheel",
    traffic={"timeout": SETTINGS.request_timeout_s, "max_concurrency": SETTINGS.max_concurrency},
    metrics={"enabled": True, "duration": LATENCY_BUCKETS},
)
@bentoml.asgi_app(app, path="/")
class Flywheel:
    """The public API; generation goes through the batching generator."""

    generator = bentoml.depends(Generator)

    def __init__(self) -> None:
        self.gateway = Gateway(SETTINGS, self.generator)

    @bentoml.on_shutdown
    def _close(self) -> None:
        self.gateway.close()

    @app.get("/", include_in_schema=False)
    def playground(self) -> HTMLResponse:
        return HTMLResponse(playground_html())

    @app.post("/generate")
    async def generate(self, request: Request) -> JSONResponse:
        return await self.gateway.generate(request)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(self, request: Request) -> JSONResponse | StreamingResponse:
        return await self.gateway.chat_completions(request)

    @app.post("/v1/completions", response_model=None)
    async def completions(self, request: Request) -> JSONResponse | StreamingResponse:
        return await self.gateway.completions(request)

    @app.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        return await self.gateway.models(request)

    @app.post("/feedback")
    async def feedback(self, request: Request) -> JSONResponse:
        return await self.gateway.feedback(request)

    @app.post("/admin/reload")
    async def reload(self, request: Request) -> JSONResponse:
        return await self.gateway.reload(request)


# On the service, not the mounted app, so BentoML's own routes (/metrics, /healthz) carry it too.
# (`@bentoml.service` returns a Service object; its type stub still says the class.)
Flywheel.add_asgi_middleware(ModelVersionHeader)  # type: ignore[attr-defined]
