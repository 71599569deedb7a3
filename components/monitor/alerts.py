"""Prometheus alerting rules for a served profile, with the thresholds of its `monitor:` section.

The rules watch the same requests the monitor flow reads from `/metrics` (the gateway's user
endpoints, `components/monitor/scrape.py`), so an operator's page and the monitor's decision
never disagree about what an error or a slow answer is. `scripts/monitoring.py` writes them
to `deployments/monitoring/rules/<profile>.yml`; a test checks the shipped files match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from components.config import PipelineConfig
from components.monitor.pushed import RETRAIN_FAILURE, RETRAIN_SUCCESS
from components.monitor.scrape import GATEWAY, USER_ENDPOINTS

JOB = "flywheel"  # the scrape job of deployments/monitoring/prometheus.yml
WINDOW = "5m"  # rates are taken over this window
USER_SELECTOR = f'service_name="{GATEWAY}",endpoint=~"{"|".join(sorted(USER_ENDPOINTS))}"'


def latency_slo_seconds(config: PipelineConfig) -> float:
    """`monitor.max_p95_latency_s`, else the batching latency budget of `serve:`."""
    return config.monitor.max_p95_latency_s or config.serve.max_latency_ms / 1000


@dataclass(frozen=True)
class Alert:
    """An alert: `signal` (a query that has data whenever the service is scraped) compared
    with `condition` (empty when the signal is the whole expression)."""

    name: str
    signal: str
    condition: str
    for_: str
    severity: str
    summary: str

    def rule(self) -> dict[str, Any]:
        return {
            "alert": self.name,
            "expr": f"{self.signal} {self.condition}".strip(),
            "for": self.for_,
            "labels": {"severity": self.severity, "service": "flywheel"},
            "annotations": {"summary": self.summary},
        }


def _requests(codes: str | None = None) -> str:
    """The rate of user requests, of those answered with `codes` (a regex) when given."""
    selector = USER_SELECTOR + (f',http_response_code=~"{codes}"' if codes else "")
    return f"sum(rate(bentoml_service_request_total{{{selector}}}[{WINDOW}]))"


def quantile(q: float, buckets: str) -> str:
    """The `q` quantile of a histogram's `_bucket` series over the rate window."""
    return f"histogram_quantile({q}, sum by (le) (rate({buckets}[{WINDOW}])))"


def ratings(window: str, rating: str | None = None) -> str:
    """Ratings received in `window`, of one kind when `rating` is given (0 when none came)."""
    if rating is None:
        return f"sum(increase(flywheel_feedback_total[{window}]))"
    return f'(sum(increase(flywheel_feedback_total{{rating="{rating}"}}[{window}])) or vector(0))'


def down_rate(window: str) -> str:
    """The share of the ratings in `window` that are thumbs-down."""
    return f"{ratings(window, 'down')} / {ratings(window)}"


def retrain_failed(selector: str = "", comparison: str = ">") -> str:
    """The last failure of the training pipeline after its last success, or with no success
    yet, per profile (`comparison` `> bool` gives 1 or 0 instead of keeping the failures)."""
    failed = f"{RETRAIN_FAILURE}{selector}"
    return (
        f"{failed} {comparison} on(profile) "
        f"({RETRAIN_SUCCESS}{selector} or on(profile) {failed} * 0)"
    )


def alerts(config: PipelineConfig) -> list[Alert]:
    """Every alert of `config`'s service, with its thresholds."""
    m = config.monitor
    requests = _requests()
    # `or vector(0)`: no 5xx series yet is a rate of 0, not a missing value
    errors = f"({_requests('5..')} or vector(0))"
    rejected = f"({_requests('429|503')} or vector(0))"
    p95 = quantile(
        0.95,
        f'bentoml_service_request_duration_seconds_bucket{{{USER_SELECTOR},http_response_code="200"}}',
    )
    window = f"{int(m.interval_minutes)}m"
    feedback = ratings(window)
    slo = latency_slo_seconds(config)
    failed = retrain_failed(f'{{profile="{config.name}"}}')
    return [
        Alert(
            "FlywheelServiceDown",
            f'up{{job="{JOB}"}}',
            "== 0",
            "1m",
            "page",
            "The Flywheel service does not answer its /metrics scrape.",
        ),
        Alert(
            "FlywheelErrorRateHigh",
            f"{errors} / {requests}",
            f"> {m.max_error_rate}",
            "5m",
            "page",
            f"More than {m.max_error_rate:.0%} of user requests fail with a 5xx.",
        ),
        Alert(
            "FlywheelLatencyP95High",
            p95,
            f"> {slo:g}",
            "10m",
            "warn",
            f"p95 latency of successful user requests is over the {slo:g} s objective.",
        ),
        Alert(
            "FlywheelRequestsRejected",
            rejected,
            "> 0",
            "5m",
            "warn",
            "The service is shedding load (429 or 503 with Retry-After).",
        ),
        Alert(
            "FlywheelThumbsDownHigh",
            down_rate(window),
            f"> {m.baseline_down_rate} and {feedback} >= {m.min_feedback}",
            "0m",
            "warn",
            f"More than {m.baseline_down_rate:.0%} of the last {window} of feedback is "
            "thumbs-down; the monitor retrains when the rise is significant.",
        ),
        Alert(
            "FlywheelNoGenerations",
            f"sum(increase(flywheel_generated_tokens_total[{window}]))",
            "== 0",
            "0m",
            "warn",
            f"No tokens generated in {window}.",
        ),
        Alert(
            "FlywheelModelVersionChanged",
            "count by (model_name) (max_over_time(flywheel_model_version[10m]))",
            "> 1",
            "0m",
            "info",
            "The served model version changed in the last 10 minutes.",
        ),
        Alert(  # pushed by the flows (components/monitor/pushed.py)
            "FlywheelRetrainFailed",
            failed,
            "",
            "0m",
            "warn",
            f"The last training-pipeline run of {config.name} failed; the champion stays.",
        ),
    ]


def alert_rules(config: PipelineConfig) -> dict[str, Any]:
    """The rule file for `config`'s service, as the YAML document Prometheus reads."""
    rules = [alert.rule() for alert in alerts(config)]
    return {"groups": [{"name": f"flywheel-{config.name}", "rules": rules}]}
