"""The Grafana dashboard of a Flywheel service, written to
`deployments/monitoring/grafana/dashboards/flywheel.json` by `scripts/monitoring.py`.

Every panel query reads the service's own `/metrics` through the Prometheus datasource that
`deployments/monitoring/grafana/provisioning/` provisions (uid `prometheus`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from components.monitor.alerts import USER_SELECTOR, WINDOW, down_rate, quantile, retrain_failed
from components.monitor.pushed import MONITOR_DECISION

DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
_LATENCY = f"bentoml_service_request_duration_seconds_bucket{{{USER_SELECTOR}}}"
_TTFT = "flywheel_time_to_first_token_seconds_bucket"


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    queries: tuple[tuple[str, str], ...]  # (PromQL, legend)
    description: str = ""


PANELS: tuple[Panel, ...] = (
    Panel(
        "Traffic",
        "reqps",
        (
            (
                f"sum by (endpoint, http_response_code) (rate(bentoml_service_request_total"
                f"{{{USER_SELECTOR}}}[{WINDOW}]))",
                "{{endpoint}} {{http_response_code}}",
            ),
        ),
        "User requests per second, by endpoint and status (429 and 503 are shed load).",
    ),
    Panel(
        "Latency",
        "s",
        tuple((quantile(q, _LATENCY), f"p{round(q * 100)}") for q in (0.5, 0.95, 0.99)),
        "End-to-end latency of user requests through the gateway.",
    ),
    Panel(
        "Time to first token",
        "s",
        tuple((quantile(q, _TTFT), f"p{round(q * 100)}") for q in (0.5, 0.95)),
        "Streams: from the request to its first token.",
    ),
    Panel(
        "Generated tokens per second",
        "short",
        (
            (
                f"sum by (model_version) (rate(flywheel_generated_tokens_total[{WINDOW}]))",
                "v{{model_version}}",
            ),
        ),
    ),
    Panel(
        "Batch size",
        "short",
        (
            (
                f"sum(rate(bentoml_service_adaptive_batch_size_sum[{WINDOW}])) / "
                f"sum(rate(bentoml_service_adaptive_batch_size_count[{WINDOW}]))",
                "mean requests per batch",
            ),
        ),
        "Requests the generator ran together, per batch.",
    ),
    Panel(
        "Thumbs-down rate",
        "percentunit",
        (
            (
                down_rate("1h"),
                "down / all ratings, last hour",
            ),
        ),
        "The monitor retrains when this rises significantly over the champion's baseline.",
    ),
    Panel(
        "Correction memory",
        "reqps",
        (
            (
                f"sum by (result) (rate(flywheel_memory_lookups_total[{WINDOW}]))",
                "{{result}}",
            ),
            ("max(flywheel_memory_entries)", "entries served"),
        ),
        "Requests answered from a correction (hit), by the model (miss), or opted out (off).",
    ),
    Panel(
        "Model version served",
        "short",
        (("max by (model_name, version) (flywheel_model_version)", "{{model_name}} v{{version}}"),),
        "One line per version: a new line is a swap (a promotion or a rollback).",
    ),
    Panel(
        "Answers by served model",
        "reqps",
        (
            (
                f"sum by (model, model_version) (rate(flywheel_answers_total[{WINDOW}]))",
                "{{model}} v{{model_version}}",
            ),
        ),
        "Which served model answered (champion, canary, general, ...): a canary's share, and "
        "the traffic the router sent outside the champion's domain.",
    ),
    Panel(
        "Monitor decisions and retrains",
        "short",
        (
            (f"max by (profile) ({MONITOR_DECISION})", "{{profile}}: retrain (1) or keep (0)"),
            (retrain_failed(comparison="> bool"), "{{profile}}: last retrain failed (1)"),
        ),
        "Pushed by the flows to the Pushgateway: the monitor's last decision, and whether the "
        "last training-pipeline run failed.",
    ),
)


def dashboard() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model."""
    panels = []
    for i, panel in enumerate(PANELS):
        panels.append(
            {
                "id": i + 1,
                "type": "timeseries",
                "title": panel.title,
                "description": panel.description,
                "datasource": DATASOURCE,
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [
                    {
                        "refId": chr(ord("A") + j),
                        "datasource": DATASOURCE,
                        "expr": expr,
                        "legendFormat": legend,
                    }
                    for j, (expr, legend) in enumerate(panel.queries)
                ],
            }
        )
    return {
        "uid": "flywheel",
        "title": "Flywheel service",
        "tags": ["flywheel"],
        "timezone": "browser",
        "schemaVersion": 39,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "panels": panels,
    }
