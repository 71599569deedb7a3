"""Tracing: a real `bentoml serve` exports one request's spans over OTLP/HTTP to a collector
(here a receiver in the test that decodes the protobuf export), gateway -> answer ->
generator -> batch; the trace id is in the response header and the inference log."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from components.config import TracingConfig
from components.inference.store import InferenceStore
from service.tracing import tracing_options
from tests.conftest import ServedService, free_port


class Collector:
    """An OTLP/HTTP trace receiver: every span exported to it, by trace id."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                collector.receive(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def receive(self, export: ExportTraceServiceRequest) -> None:
        for resource in export.resource_spans:
            attrs = {a.key: a.value.string_value for a in resource.resource.attributes}
            for scope in resource.scope_spans:
                for span in scope.spans:
                    record = {
                        "service": attrs.get("service.name"),
                        "name": span.name,
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent": span.parent_span_id.hex() or None,
                        "attributes": {a.key: a.value for a in span.attributes},
                    }
                    with self.lock:
                        self.spans.append(record)

    def trace(self, trace_id: str, needed: set[tuple[str, str]], timeout: float = 60) -> list[dict]:
        """The spans of one trace, once the `needed` (service, span name) have all arrived:
        each process exports its spans in its own batches, every few seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                spans = [s for s in self.spans if s["trace_id"] == trace_id]
            if needed <= {(s["service"], s["name"]) for s in spans}:
                return spans
            time.sleep(0.5)
        raise AssertionError(f"of {needed}, only these spans of {trace_id} arrived: {spans}")

    def stop(self) -> None:
        self.server.shutdown()


ONE_REQUEST = {
    ("flywheel", "POST /generate"),
    ("flywheel", "flywheel.answer"),
    ("flywheel-generator", "POST /generate"),
    ("flywheel-generator", "flywheel.batch"),
}


def test_tracing_is_off_by_default_and_exports_otlp_over_http_when_on() -> None:
    assert tracing_options(TracingConfig()) == {}
    on = tracing_options(TracingConfig(enabled=True, endpoint="http://c:4318/v1/traces"))
    assert on == {
        "exporter_type": "otlp",
        "sample_rate": 1.0,
        "otlp": {"protocol": "http", "endpoint": "http://c:4318/v1/traces"},
    }


@pytest.mark.slow
def test_one_request_is_one_trace_through_gateway_answer_generator_and_batch(
    champion_home, tmp_path
) -> None:
    collector = Collector()
    settings = f"serve.tracing.enabled=true serve.tracing.endpoint={collector.url}"
    service = ServedService(
        champion_home, env={"FLYWHEEL_SET": settings, "BENTOML_HOME": str(tmp_path / "bentoml")}
    )
    try:
        service.wait_ready()
        answer = httpx.post(
            f"{service.url}/generate", json={"prompt": "Trace me", "max_new_tokens": 4}, timeout=60
        )
        assert answer.status_code == 200
        trace_id = answer.headers["x-trace-id"]
        assert len(trace_id) == 32 and int(trace_id, 16)

        spans = collector.trace(trace_id, ONE_REQUEST)
        by_id = {s["span_id"]: s for s in spans}

        def one(service_name: str, name: str) -> dict:
            found = [s for s in spans if s["service"] == service_name and s["name"] == name]
            assert len(found) == 1, (service_name, name, spans)
            return found[0]

        gateway = one("flywheel", "POST /generate")
        answer_span = one("flywheel", "flywheel.answer")
        generator = one("flywheel-generator", "POST /generate")
        batch = one("flywheel-generator", "flywheel.batch")

        def ancestors(span: dict) -> list[str]:
            chain = []
            while span["parent"] in by_id:
                span = by_id[span["parent"]]
                chain.append(span["span_id"])
            return chain

        assert gateway["parent"] is None  # the root: the client sent no traceparent
        assert answer_span["parent"] == gateway["span_id"]
        assert answer_span["span_id"] in ancestors(generator)  # across the process boundary
        assert batch["parent"] == generator["span_id"]
        assert batch["attributes"]["flywheel.batch_size"].int_value >= 1
        verdicts = answer_span["attributes"]
        assert verdicts["flywheel.memory"].string_value == answer.headers["x-flywheel-memory"]
        assert verdicts["flywheel.cache"].string_value == answer.headers["x-flywheel-cache"]

        with InferenceStore(f"sqlite:///{champion_home / 'feedback.db'}") as logged:
            record = logged.get(answer.json()["request_id"])
        assert record is not None and record.trace_id == trace_id

        # A client's own trace goes on through the service.
        parent = "4bf92f3577b34da6a3ce929d0e0e4736"
        traceparent = f"00-{parent}-00f067aa0ba902b7-01"
        chat = {"messages": [{"role": "user", "content": "And me"}], "max_tokens": 4}
        followed = httpx.post(
            f"{service.url}/v1/chat/completions",
            json=chat,
            headers={"traceparent": traceparent},
            timeout=60,
        )
        assert followed.status_code == 200 and followed.headers["x-trace-id"] == parent
        continued = collector.trace(parent, {("flywheel", "POST /v1/chat/completions")})
        root = [s for s in continued if s["parent"] == "00f067aa0ba902b7"]
        assert [s["service"] for s in root] == ["flywheel"]
    finally:
        service.stop()
        collector.stop()
