"""Request and response shapes of the public API, and the OpenAI wire format.

Plain pydantic, so the service validates with them and tests can build them without a server.
Errors follow OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ApiError(Exception):
    """A client error with the field it concerns; rendered as OpenAI-style JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


def _stop_list(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else list(value)
    if len(stops) > 4:
        raise ValueError("at most 4 stop sequences")
    return stops


class SamplingFields(BaseModel):
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list)

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, value: Any) -> list[str]:
        return _stop_list(value)


class GenerateRequest(SamplingFields):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    max_new_tokens: int | None = Field(default=None, ge=1)


class GenerateResponse(BaseModel):
    text: str
    request_id: str
    model_version: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=64)
    rating: Literal["up", "down"]
    correction: str | None = Field(default=None, max_length=20_000)
    comment: str | None = Field(default=None, max_length=5_000)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(SamplingFields):
    # Ignore the OpenAI parameters we do not implement (penalties, logit_bias, ...), as
    # OpenAI-compatible servers commonly do, rather than failing every such client.
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    n: Literal[1] = 1


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str = Field(min_length=1)
    max_tokens: int | None = Field(default=16, ge=1)
    stream: bool = False
    n: Literal[1] = 1
    echo: Literal[False] = False


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def finish_reason(completion_tokens: int, limit: int) -> str:
    return "length" if completion_tokens >= limit else "stop"


def chat_completion(
    request_id: str, model: str, text: str, prompt_tokens: int, completion_tokens: int, limit: int
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason(completion_tokens, limit),
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def text_completion(
    request_id: str, model: str, text: str, prompt_tokens: int, completion_tokens: int, limit: int
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish_reason(completion_tokens, limit),
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event line in OpenAI's stream format."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def chat_chunk(
    request_id: str, model: str, created: int, delta: dict[str, str], finish: str | None = None
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def completion_chunk(
    request_id: str, model: str, created: int, text: str, finish: str | None = None
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }
