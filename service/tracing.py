"""OpenTelemetry in the service: BentoML's tracing options from the profile, the trace id of
the request being served, and the spans Flywheel adds to BentoML's own.

BentoML opens a server span for every HTTP request to either service and passes the W3C
`traceparent` on each call from the gateway to the generator, so one request reads as:

    flywheel  POST /generate                 (BentoML: the gateway's server span)
      flywheel.answer                         (the memory's and the cache's verdicts)
        flywheel-generator  POST /generate    (BentoML: the generator's server span)
          flywheel.batch                      (the batch or engine call it rode in)

A client that sends `traceparent` continues its own trace. With tracing off nothing is
exported, but every request still gets a trace id (answered in `x-trace-id` and written to
the inference log), so a bad answer can be followed from its feedback once tracing is on.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace

from components.config import TracingConfig

TRACE_HEADER = "x-trace-id"


def tracing_options(config: TracingConfig) -> dict[str, Any]:
    """The `tracing` section of a `@bentoml.service`: OTLP over HTTP when enabled."""
    if not config.enabled:
        return {}
    otlp: dict[str, Any] = {"protocol": "http"}
    if config.endpoint:
        otlp["endpoint"] = config.endpoint
    return {"exporter_type": "otlp", "sample_rate": config.sample_rate, "otlp": otlp}


def tracer() -> trace.Tracer:
    """Flywheel's tracer on BentoML's provider (the one its exporter is attached to)."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return BentoMLContainer.tracer_provider.get().get_tracer("flywheel")


def current_trace_id() -> str | None:
    """The trace id of the request being served (32 hex digits), None outside a request."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None
