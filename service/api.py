"""Request and response bodies of the public API, its errors, and the OpenAI wire shapes.

Request bodies are pydantic models that FastAPI validates; every rule about a field lives on
the field, so a wrong type, a non-finite number or an out-of-range value anywhere is a 4xx
naming it. Responses in OpenAI's format are built from the types the `openai` package ships,
so they cannot drift from what its client parses. Errors follow OpenAI's shape:
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from openai.types import Completion, CompletionChoice, CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice as ChatChoice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator

from components.config import MODEL_NAME

MAX_STOP_SEQUENCES = 4
MAX_CHOICES = 8  # `n`: how many answers one whole (not streamed) completion may ask for


class ApiError(Exception):
    """A client error with the field it concerns; rendered as OpenAI-style JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code or kind}}


def _as_list(value: Any) -> Any:
    """OpenAI's `stop` is a string or a list of strings; anything else fails as a list."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


Stop = Annotated[
    list[Annotated[str, Field(min_length=1)]],
    BeforeValidator(_as_list),
    Field(max_length=MAX_STOP_SEQUENCES),
]


class Body(BaseModel):
    """A request body: no NaN or infinity anywhere, unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SamplingFields(Body):
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Stop = Field(default_factory=list)
    # sampling from the same seed gives the same answer (with the same model and settings)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)


# Which served model answers (GET /v1/models lists them); left out, the router chooses.
ModelChoice = Annotated[str | None, Field(min_length=1, max_length=200)]
# A user or conversation id: keeps a user on one side of a canary.
UserId = Annotated[str | None, Field(min_length=1, max_length=256)]


class GenerateRequest(SamplingFields):
    prompt: str = Field(min_length=1)
    max_new_tokens: int | None = Field(default=None, ge=1)
    model: ModelChoice = None
    user: UserId = None


class GenerateResponse(BaseModel):
    text: str
    request_id: str
    model_version: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float


class FeedbackRequest(Body):
    request_id: str = Field(min_length=1, max_length=64)
    rating: Literal["up", "down"]
    correction: str | None = Field(default=None, max_length=20_000)
    comment: str | None = Field(default=None, max_length=5_000)


class FeedbackResponse(BaseModel):
    request_id: str
    rating: str
    stored: bool
    memory: str | None = None  # what the correction memory did with a correction


class ReloadRequest(Body):
    """Serve `model_uri` (`models:/name/3`, `@alias`, `base`) as the model named `model`."""

    model_uri: str = Field(min_length=1, max_length=500)
    model: str = Field(default="champion", pattern=MODEL_NAME)


class TextPart(Body):
    """One part of a message's content; text is the only kind this server reads."""

    type: Literal["text"]
    text: str


class ChatMessage(Body):
    """One message. `developer` is OpenAI's newer name for `system`; content may be a list of
    text parts (joined with newlines); `name` tells participants of one role apart and is
    given to the model before the content (`name: content`)."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[\w.@-]+$")

    def turn(self) -> dict[str, str]:
        """The message as the chat template takes it."""
        text = (
            self.content
            if isinstance(self.content, str)
            else "\n".join(p.text for p in self.content)
        )
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": f"{self.name}: {text}" if self.name else text}


class StreamOptions(Body):
    include_usage: bool = False  # a last chunk, before [DONE], with the token counts


class OpenAIBody(SamplingFields):
    # A parameter this server does not implement (penalties, logit_bias, tools, ...) is
    # refused with a 400 `unsupported_parameter` naming it, never silently ignored.
    model: ModelChoice = None
    user: UserId = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)

    @field_validator("n")
    @classmethod
    def _whole_for_several(cls, n: int, info: ValidationInfo) -> int:
        if n > 1 and info.data.get("stream"):
            raise ValueError("several choices (n > 1) are answered whole: ask without stream")
        return n

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(OpenAIBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(OpenAIBody):
    prompt: str = Field(min_length=1)
    max_tokens: int | None = Field(default=16, ge=1)
    echo: Literal[False] = False


def finish_reason(completion_tokens: int, limit: int) -> Literal["length", "stop"]:
    return "length" if completion_tokens >= limit else "stop"


def _usage(prompt_tokens: int, completion_tokens: int) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def wire(model: BaseModel) -> dict[str, Any]:
    """An openai type as the JSON the API sends: the fields that were set, nothing else."""
    return model.model_dump(mode="json", exclude_unset=True)


# A choice: its text, how many tokens it took, and why it ended
Answered = tuple[str, int, Literal["length", "stop"]]


def chat_completion(
    request_id: str, model: str, answers: list[Answered], prompt_tokens: int
) -> ChatCompletion:
    return ChatCompletion(
        id=request_id,
        object="chat.completion",
        created=int(time.time()),
        model=model,
        choices=[
            ChatChoice(
                index=i,
                message=ChatCompletionMessage(role="assistant", content=text),
                finish_reason=finish,
                logprobs=None,
            )
            for i, (text, _, finish) in enumerate(answers)
        ],
        usage=_usage(prompt_tokens, sum(tokens for _, tokens, _ in answers)),
    )


def text_completion(
    request_id: str, model: str, answers: list[Answered], prompt_tokens: int
) -> Completion:
    return Completion(
        id=request_id,
        object="text_completion",
        created=int(time.time()),
        model=model,
        choices=[
            CompletionChoice(index=i, text=text, logprobs=None, finish_reason=finish)
            for i, (text, _, finish) in enumerate(answers)
        ],
        usage=_usage(prompt_tokens, sum(tokens for _, tokens, _ in answers)),
    )


def chat_chunk(
    request_id: str,
    model: str,
    created: int,
    delta: ChoiceDelta,
    finish: Literal["length", "stop"] | None = None,
) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id=request_id,
        object="chat.completion.chunk",
        created=created,
        model=model,
        choices=[ChunkChoice(index=0, delta=delta, finish_reason=finish)],
    )


def completion_chunk(
    request_id: str,
    model: str,
    created: int,
    text: str,
    finish: Literal["length", "stop"] | None = None,
) -> Completion:
    # Stream chunks carry `finish_reason: null` until the last; the type only allows a value
    # (the client builds chunks without validating), so this one is built the same way.
    choice = CompletionChoice.model_construct(
        index=0,
        text=text,
        logprobs=None,
        finish_reason=finish,  # type: ignore[arg-type]
    )
    return Completion(
        id=request_id, object="text_completion", created=created, model=model, choices=[choice]
    )


def usage_chunk(
    kind: str, request_id: str, model: str, created: int, prompt_tokens: int, completion_tokens: int
) -> BaseModel:
    """A stream's last chunk under `stream_options.include_usage`: no choices, the usage."""
    usage = _usage(prompt_tokens, completion_tokens)
    if kind == "chat":
        return ChatCompletionChunk(
            id=request_id,
            object="chat.completion.chunk",
            created=created,
            model=model,
            choices=[],
            usage=usage,
        )
    return Completion(
        id=request_id,
        object="text_completion",
        created=created,
        model=model,
        choices=[],
        usage=usage,
    )


def model_card(model_id: str, version: str, **extra: Any) -> Model:
    """One served model as `/v1/models` lists it (its version and `extra` as extra fields)."""
    return Model(
        id=model_id, object="model", created=0, owned_by="flywheel", version=version, **extra
    )


def sse(data: BaseModel | str) -> str:
    """One server-sent event line in OpenAI's stream format."""
    text = data if isinstance(data, str) else data.model_dump_json(exclude_unset=True)
    return f"data: {text}\n\n"
