"""What the inference log holds: a generation, its feedback, the two joined, and the store's
errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Rating = Literal["up", "down"]


@dataclass(frozen=True)
class InferenceRecord:
    request_id: str
    created_at: float
    model_version: str
    endpoint: str
    prompt: str
    response: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    confidence: float | None = None
    memory_entry: str | None = None  # the correction-memory entry that answered, if one did
    memory_note: str | None = None  # why the memory answered or abstained
    trace_id: str | None = None  # the request's OpenTelemetry trace (32 hex digits)
    route: str | None = None  # where the router sent it: champion, scope, a model's name, off
    route_similarity: float | None = None  # to the champion's nearest training prompt
    error: str | None = None  # why the answer stopped short (a stream that failed midway)


@dataclass(frozen=True)
class FeedbackRecord:
    request_id: str
    rating: Rating
    correction: str | None
    comment: str | None
    created_at: float
    client: str | None = None  # the verified identity that sent it (service/auth.py)


@dataclass(frozen=True)
class Answer(InferenceRecord):
    """A logged generation joined with its feedback (None where there is none)."""

    rating: Rating | None = None
    correction: str | None = None
    comment: str | None = None
    rated_at: float | None = None
    rated_by: str | None = None  # the verified identity that rated it


class UnknownRequest(KeyError):
    """Feedback for a request id that was never logged."""


class StoreBusy(RuntimeError):
    """The database did not take writes in time; what was queued is kept in the spool."""
