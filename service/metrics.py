"""The project's own Prometheus metrics (`flywheel_*`), served on /metrics beside BentoML's."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any


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
