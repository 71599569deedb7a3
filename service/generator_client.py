"""The gateway's one link to the generator service: typed calls, retries, errors as API errors.

BentoML hands the gateway a client of the `Generator` service; everything the gateway asks of
it goes through `GeneratorClient`, which retries a call whose pooled connection the generator
had already closed, turns BentoML's plain dicts back into `GenerationOutput`, reads a stream's
JSON lines, and maps the error codes the models report to HTTP statuses.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import anyio

from components.serving.protocol import GenerationInput, GenerationOutput
from service.api import ApiError

log = logging.getLogger("flywheel.service")

# The HTTP status of each error code a model reports; any other code is the client's (400).
ERROR_STATUS = {"model_not_ready": 503, "model_not_found": 404, "generation_failed": 500}


def raise_for(out: GenerationOutput, param: str | None = None) -> None:
    """The generator's error as an API error; `param` names this route's prompt field where
    the generator speaks of the prompt it was given (`/generate` sends its prompt as messages)."""
    if out.error:
        status = ERROR_STATUS.get(out.error_code or "", 400)
        field = out.error_param
        if param and field in ("messages", "prompt"):
            field = param
        raise ApiError(
            status,
            out.error,
            param=field if status < 500 else None,
            code=out.error_code or "invalid_request_error",
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


class GeneratorClient:
    """Typed calls to the generator service (`generator`: BentoML's dependency handle, or any
    object with the same async API under `to_async`)."""

    def __init__(self, generator: Any) -> None:
        self.generator = generator

    async def generate(self, item: GenerationInput, param: str | None = None) -> GenerationOutput:
        """One answer through the batching generator; `param` names the prompt field in errors."""
        results = await with_connection_retry(
            lambda: self.generator.to_async.generate(inputs=[item])
        )
        out = _as_output(results[0])
        raise_for(out, param)
        return out

    async def count_tokens(
        self, item: GenerationInput, answer: str, param: str | None = None
    ) -> GenerationOutput:
        """A fixed answer (a correction, the scope reply) as an output, with the served
        model's token counts."""
        out = _as_output(
            await with_connection_retry(
                lambda: self.generator.to_async.count_tokens(item=item, answer=answer)
            )
        )
        raise_for(out, param)
        return out

    async def stream(self, item: GenerationInput) -> AsyncIterator[GenerationOutput]:
        """The answer's pieces as the generator sends them (one JSON line each)."""
        buffer = ""
        async for chunk in self.generator.to_async.stream(item=item):
            buffer += chunk if isinstance(chunk, str) else chunk.decode()
            while "\n" in buffer:
                line, buffer = buffer.split("\n", 1)
                if line.strip():
                    yield GenerationOutput.model_validate_json(line)

    async def models(self) -> list[dict[str, Any]]:
        """The generator's models (name, version, engine, memory, or why not ready)."""
        rows = await with_connection_retry(lambda: self.generator.to_async.models())
        return [dict(row) for row in rows]

    async def reload(self, model_uri: str, model: str) -> dict[str, Any]:
        return dict(await self.generator.to_async.reload(model_uri=model_uri, model=model))

    async def unload(self, model: str) -> dict[str, Any]:
        return dict(await self.generator.to_async.unload(model=model))
