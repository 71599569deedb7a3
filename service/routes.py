"""What the public routes do behind their typed bodies: plan, generate, stream, record, answer.

FastAPI validates every body against the models in `service/api.py`; the handlers here turn
any client mistake into a 4xx with an OpenAI-style JSON error naming the field, and nothing a
client sends surfaces as a 500.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import anyio
from fastapi.responses import JSONResponse, StreamingResponse
from openai.types.chat.chat_completion_chunk import ChoiceDelta

from components.config import MemoryConfig, ServeConfig
from components.inference.records import InferenceRecord
from components.inference.store import InferenceStore
from components.memory.store import CorrectionMemory
from components.retrieval.index import DocsIndex
from components.serving.protocol import GenerationInput, GenerationOutput, failed
from components.serving.router import Router
from components.text import scrub_pii
from service.api import (
    Answered,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    GenerateResponse,
    OpenAIBody,
    chat_chunk,
    chat_completion,
    completion_chunk,
    error_body,
    finish_reason,
    sse,
    text_completion,
    usage_chunk,
    wire,
)
from service.feedback import FeedbackDesk
from service.generator_client import GeneratorClient, raise_for
from service.metrics import flywheel_metrics
from service.models import ServedModels
from service.plan import ASK_ALL, Asked, Plan, Planner
from service.tracing import current_trace_id, tracer

log = logging.getLogger("flywheel.service")
REQUEST_ID_PREFIX = {"generate": "gen", "chat": "chatcmpl", "completion": "cmpl"}


@dataclass(frozen=True)
class Asking:
    """One generation request as the gateway handles it."""

    kind: str  # generate, chat or completion: the endpoint label in logs and metrics
    item: GenerationInput  # what the generator is asked
    prompt: str  # the whole prompt, as the inference log keeps it
    question: str  # what the memory, the router and the docs are asked
    request_id: str
    started: float  # time.perf_counter() when the request arrived


class Gateway:
    """What the public routes do, given the generator dependency: generation here, the served
    models (`models`) and feedback (`feedback`) in rooms of their own."""

    def __init__(
        self,
        settings: ServeConfig,
        generator: Any,
        model_name: str,
        memory: MemoryConfig,
        docs: DocsIndex | None = None,
    ) -> None:
        self.settings = settings
        self.generator = GeneratorClient(generator)
        self.model_name = model_name
        self.store = InferenceStore()
        self.metrics = flywheel_metrics()
        self.memory = CorrectionMemory(memory) if memory.enabled else None
        routing = settings.routing
        self.router = (
            Router(routing, model_name, memory.embedding_model) if routing.enabled else None
        )
        self.planner = Planner(settings, self.metrics, self.memory, self.router, docs)
        self.models = ServedModels(self.generator, model_name, self.metrics, self.router)
        self.feedback = FeedbackDesk(self.store, self.memory, self.metrics)

    def warm_memory(self) -> None:
        """Load the embedding model in the background, so the first lookup does not wait."""
        if self.memory is not None:
            memory = self.memory
            threading.Thread(target=lambda: memory.embedder, daemon=True).start()

    def close(self) -> None:
        self.store.close()
        if self.memory is not None:
            self.memory.close()

    async def _answer(self, plan: Plan, param: str | None = None) -> GenerationOutput:
        """The plan's fixed answer with the model's token counts, else the model's answer."""
        with tracer().start_as_current_span("flywheel.answer") as span:
            span.set_attribute("flywheel.memory", plan.memory)
            span.set_attribute("flywheel.route", plan.route)
            if plan.fixed is None:
                out = await self.generator.generate(plan.item, param)
                self.metrics.response_cache.labels(out.cache).inc()
            else:
                out = await self.generator.count_tokens(plan.item, plan.fixed, param)
            self.models.answered_by(out)
            span.set_attribute("flywheel.cache", out.cache)
            return out

    def _asking(
        self,
        kind: str,
        req: GenerateRequest | OpenAIBody,
        prompt: str,
        prompt_param: str,
        max_tokens: int | None,
        max_tokens_param: str,
        *,
        messages: list[dict[str, str]] | None = None,
        text: str | None = None,
        question: str | None = None,
    ) -> Asking:
        """One request as the generator is asked it, after the limits on its prompt and its
        number of new tokens (each refusal names the field)."""
        started = time.perf_counter()
        limits = self.settings
        if len(prompt) > limits.max_prompt_chars:
            raise ApiError(
                413,
                f"{prompt_param} is {len(prompt)} characters; "
                f"the limit is {limits.max_prompt_chars}",
                param=prompt_param,
                code="prompt_too_long",
            )
        if max_tokens is None:
            max_tokens = limits.default_max_new_tokens
        elif max_tokens > limits.max_new_tokens_limit:
            message = f"{max_tokens_param} must be at most {limits.max_new_tokens_limit}"
            raise ApiError(422, message, param=max_tokens_param)
        item = GenerationInput(
            messages=messages,
            text=text,
            max_new_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=req.stop,
            seed=req.seed,
            # The registered model's name lets the router (and the canary) choose; the
            # generator answers 404 for a name it does not serve.
            model=None if req.model in (None, self.model_name) else req.model,
            user=req.user,
        )
        request_id = f"{REQUEST_ID_PREFIX[kind]}-{uuid.uuid4().hex}"
        return Asking(kind, item, prompt, question or prompt, request_id, started)

    def _record(self, asking: Asking, out: GenerationOutput, plan: Plan) -> float:
        """Log an answer in the inference log and count it; returns its latency in ms."""
        latency_ms = round((time.perf_counter() - asking.started) * 1000, 1)
        prompt = asking.prompt
        stored = {
            "full": lambda: prompt,
            "off": lambda: "",
            "redacted": lambda: scrub_pii(prompt, Counter()),
        }[self.settings.log_prompts]()
        self.store.log(
            InferenceRecord(
                request_id=asking.request_id,
                created_at=time.time(),
                model_version=out.model_version,
                endpoint=asking.kind,
                prompt=stored,
                response=out.text,
                prompt_tokens=out.prompt_tokens,
                completion_tokens=out.completion_tokens,
                latency_ms=latency_ms,
                confidence=out.confidence,
                memory_entry=plan.recall.entry.id if plan.recall else None,
                memory_note=plan.memory_note,
                trace_id=current_trace_id(),
                route=plan.route,
                route_similarity=plan.similarity,
                error=out.error,
            )
        )
        version, endpoint = out.model_version, asking.kind
        self.metrics.generated_tokens.labels(version, endpoint).inc(out.completion_tokens)
        self.metrics.prompt_tokens.labels(version, endpoint).inc(out.prompt_tokens)
        self.metrics.answers.labels(out.model, version).inc()
        return latency_ms

    async def generate(self, req: GenerateRequest, asked: Asked = ASK_ALL) -> JSONResponse:
        asking = self._asking(
            "generate",
            req,
            req.prompt,
            "prompt",
            req.max_new_tokens,
            "max_new_tokens",
            messages=[{"role": "user", "content": req.prompt}],
        )
        plan = await self.planner.plan(asking.item, asking.question, asked)
        out = await self._answer(plan, param="prompt")
        latency = self._record(asking, out, plan)
        reply = GenerateResponse(
            text=out.text,
            request_id=asking.request_id,
            model_version=out.model_version,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            latency_ms=latency,
        )
        return JSONResponse({**reply.model_dump(), **plan.sources()}, headers=plan.headers(out))

    async def chat_completions(
        self, req: ChatCompletionRequest, asked: Asked = ASK_ALL
    ) -> JSONResponse | StreamingResponse:
        messages = [m.turn() for m in req.messages]
        users = [m["content"] for m in messages if m["role"] == "user"]
        prompt = "\n".join(m["content"] for m in messages)
        asking = self._asking(
            "chat",
            req,
            prompt,
            "messages",
            req.max_completion_tokens or req.max_tokens,
            "max_completion_tokens" if req.max_completion_tokens else "max_tokens",
            messages=messages,
            question=users[-1] if users else prompt,
        )
        return await self._complete(asking, req, asked)

    async def completions(
        self, req: CompletionRequest, asked: Asked = ASK_ALL
    ) -> JSONResponse | StreamingResponse:
        asking = self._asking(
            "completion", req, req.prompt, "prompt", req.max_tokens, "max_tokens", text=req.prompt
        )
        return await self._complete(asking, req, asked)

    async def _complete(
        self, asking: Asking, req: OpenAIBody, asked: Asked
    ) -> JSONResponse | StreamingResponse:
        """An OpenAI completion (chat or text), from the memory or the model, whole or streamed."""
        plan = await self.planner.plan(asking.item, asking.question, asked)
        if req.stream:
            return await self._stream(asking, plan, req)
        outs = await self._answers(plan, req.n)
        for i, out in enumerate(outs):  # each choice is logged; the first under the request's id
            choice = asking if i == 0 else replace(asking, request_id=f"{asking.request_id}-{i}")
            self._record(choice, out, plan)
        build = chat_completion if asking.kind == "chat" else text_completion
        limit = asking.item.max_new_tokens
        answers: list[Answered] = [
            # a correction is a whole answer, whatever its length
            (
                o.text,
                o.completion_tokens,
                "stop" if plan.fixed else finish_reason(o.completion_tokens, limit),
            )
            for o in outs
        ]
        reply = build(
            asking.request_id, req.model or self.model_name, answers, outs[0].prompt_tokens
        )
        return JSONResponse({**wire(reply), **plan.sources()}, headers=plan.headers(outs[0]))

    async def _answers(self, plan: Plan, n: int) -> list[GenerationOutput]:
        """`n` answers to the plan, generated side by side (each joins the engine's batch)."""
        if n == 1:
            return [await self._answer(plan)]
        outs: list[GenerationOutput | None] = [None] * n

        async def answer(i: int) -> None:
            outs[i] = await self._answer(plan)

        try:
            async with anyio.create_task_group() as group:
                for i in range(n):
                    group.start_soon(answer, i)
        except* ApiError as failed_choices:  # one answer for all: the first error, as it is
            raise failed_choices.exceptions[0] from None
        return [out for out in outs if out is not None]

    async def _fixed_outputs(
        self, item: GenerationInput, answer: str
    ) -> AsyncIterator[GenerationOutput]:
        """A fixed answer (a correction, the scope reply) as a stream: the whole answer, then
        its token counts."""
        counted = await self.generator.count_tokens(item, answer)
        yield counted.model_copy(update={"prompt_tokens": 0, "completion_tokens": 0})
        yield counted.model_copy(update={"text": ""})

    async def _stream(self, asking: Asking, plan: Plan, req: OpenAIBody) -> StreamingResponse:
        """A stream of the answer; its first chunk carries the sources when grounded."""
        kind, request_id, limit = asking.kind, asking.request_id, asking.item.max_new_tokens
        outputs = (
            self.generator.stream(plan.item)
            if plan.fixed is None
            else self._fixed_outputs(plan.item, plan.fixed)
        )
        first = await anext(outputs)
        raise_for(first)  # fail before any byte is sent, as a normal 4xx
        self.metrics.time_to_first_token.labels(kind).observe(time.perf_counter() - asking.started)
        self.models.answered_by(first)
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
            failure: GenerationOutput | None = None
            try:
                async for out in outputs:
                    if out.error:
                        failure = out
                        break
                    if out.text:
                        text += out.text
                        yield event(out.text)
                    last = out
            except Exception as exc:  # the generator went away: the same as its error
                failure = failed(f"the generation stopped: {exc}", "generation_failed")
            if failure is not None:  # after the first byte: an error event, never "stop"
                log.warning("stream %s failed: %s", request_id, failure.error)
                yield sse(json.dumps(error_body(500, failure.error or "", code=failure.error_code)))
            else:
                finish = "stop" if plan.fixed else finish_reason(last.completion_tokens, limit)
                yield event("", finish=finish)
                if req.include_usage:
                    counts = (last.prompt_tokens, last.completion_tokens)
                    yield sse(usage_chunk(kind, request_id, model, created, *counts))
                yield sse("[DONE]")
            final = GenerationOutput(  # what was sent, and why it stopped short if it did
                text=text,
                prompt_tokens=last.prompt_tokens,
                completion_tokens=last.completion_tokens,
                model_version=first.model_version,
                model=first.model,
                error=failure.error if failure is not None else None,
            )
            self._record(asking, final, plan)

        headers = {"x-request-id": request_id, **plan.headers(first)}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
