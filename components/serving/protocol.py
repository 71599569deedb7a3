"""What the gateway and the generator say to each other: a generation request and its output.

An output that failed carries the error's kind (`error_code`: model_not_ready,
model_not_found, generation_failed, or a client mistake such as context_length_exceeded) and
the field it concerns; the service decides which HTTP status each kind gets.
"""

from __future__ import annotations

from pydantic import BaseModel

from components.serving.cache import Lookup


class GenerationInput(BaseModel):
    """What the generator receives: chat messages (templated here) or raw text."""

    messages: list[dict[str, str]] | None = None
    text: str | None = None
    # Which served model answers (a name in `serve.models`, or `canary`); None: the
    # champion, or the canary for its share of users (`user` keeps a user on one of them).
    model: str | None = None
    routed: bool = False  # `model` is the router's choice: the champion answers without it
    user: str | None = None
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = []
    seed: int | None = None


class GenerationOutput(BaseModel):
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    confidence: float | None = None
    model_version: str = ""
    model: str = ""  # the name of the served model that answered
    error: str | None = None
    error_param: str | None = None
    error_code: str | None = None  # the kind of error (the service maps it to a status)
    cache: Lookup = "off"  # what the response cache did: hit, miss, error (unreachable), off


def failed(message: str, code: str, param: str | None = None) -> GenerationOutput:
    """An output that reports an error of kind `code` (about the field `param`)."""
    return GenerationOutput(error=message, error_code=code, error_param=param)
