"""Reading the service's metrics: cumulative counters, deltas between scrapes, quantiles.

From one service's `/metrics`, or, for several replicas, from Prometheus: its `/federate`
endpoint gives the latest sample of every series of the service's scrape job, one per
replica, and the same sums then cover the whole fleet.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

GATEWAY = "flywheel"  # the public BentoML service; the generator's requests are internal
USER_ENDPOINTS = frozenset({"/generate", "/v1/chat/completions", "/v1/completions"})


class ScrapeError(RuntimeError):
    """The service's `/metrics` could not be read."""


@dataclass(frozen=True)
class Scrape:
    """Cumulative counters from one read of the service's `/metrics`."""

    taken_at: float
    requests: float = 0.0
    server_errors: float = 0.0
    # (upper bound, cumulative count) of successful user requests' latency, `+Inf` last
    latency_buckets: tuple[tuple[float, float], ...] = ()
    generated_tokens: float = 0.0
    batch_size_sum: float = 0.0
    batch_count: float = 0.0
    model_version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["latency_buckets"] = [[str(le), n] for le, n in self.latency_buckets]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scrape:
        buckets = tuple((float(le), float(n)) for le, n in data.get("latency_buckets", []))
        return cls(**{**data, "latency_buckets": buckets})


def parse_metrics(text: str, taken_at: float) -> Scrape:
    """Sum the series the monitor needs out of a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    totals = {"requests": 0.0, "errors": 0.0, "tokens": 0.0, "batch_sum": 0.0, "batch_n": 0.0}
    buckets: dict[float, float] = {}
    version = None
    for family in text_string_to_metric_families(text):
        for name, labels, value, *_ in family.samples:
            user_request = (
                labels.get("service_name") == GATEWAY and labels.get("endpoint") in USER_ENDPOINTS
            )
            code = labels.get("http_response_code", "")
            if name == "bentoml_service_request_total" and user_request:
                totals["requests"] += value
                totals["errors"] += value if code.startswith("5") else 0.0
            elif (
                name == "bentoml_service_request_duration_seconds_bucket"
                and user_request
                and code.startswith("2")
            ):
                le = float(labels["le"])
                buckets[le] = buckets.get(le, 0.0) + value
            elif name == "flywheel_generated_tokens_total":
                totals["tokens"] += value
            elif name.startswith("bentoml_service_adaptive_batch_size_") and (
                labels.get("method_name") == "generate"
            ):
                if name.endswith("_sum"):
                    totals["batch_sum"] += value
                elif name.endswith("_count"):
                    totals["batch_n"] += value
            elif name == "flywheel_model_version" and value == 1:
                version = labels.get("version")
    return Scrape(
        taken_at=taken_at,
        requests=totals["requests"],
        server_errors=totals["errors"],
        latency_buckets=tuple(sorted(buckets.items())),
        generated_tokens=totals["tokens"],
        batch_size_sum=totals["batch_sum"],
        batch_count=totals["batch_n"],
        model_version=version,
    )


def scrape(url: str, timeout: float = 10.0) -> Scrape:
    """Read `<url>/metrics` now."""
    import httpx

    try:
        response = httpx.get(f"{url.rstrip('/')}/metrics", timeout=timeout)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise ScrapeError(f"cannot read {url}/metrics: {exc}") from exc
    return parse_metrics(response.text, time.time())


def scrape_fleet(prometheus_url: str, job: str, timeout: float = 10.0) -> Scrape:
    """Read every replica's latest metrics as Prometheus scraped them (job `job`), summed."""
    import httpx

    url = f"{prometheus_url.rstrip('/')}/federate"
    try:
        response = httpx.get(url, params={"match[]": f'{{job="{job}"}}'}, timeout=timeout)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise ScrapeError(f"cannot read the fleet's metrics from {url}: {exc}") from exc
    if not response.text.strip():
        raise ScrapeError(f"Prometheus at {prometheus_url} has no series of the job {job!r}")
    return parse_metrics(response.text, time.time())


def histogram_quantile(q: float, buckets: tuple[tuple[float, float], ...]) -> float | None:
    """Prometheus' `histogram_quantile`: linear interpolation inside the bucket holding `q`."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_le, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):  # past the last finite bound: the best we can say
                return lower_le
            if count == lower_count:
                return le
            return lower_le + (le - lower_le) * (rank - lower_count) / (count - lower_count)
        lower_le, lower_count = le, count
    return lower_le


@dataclass(frozen=True)
class ServiceWindow:
    """What the service did between two scrapes."""

    seconds: float
    requests: float
    server_errors: float
    error_rate: float
    request_rate: float
    p50_s: float | None
    p95_s: float | None
    p99_s: float | None
    tokens_per_s: float
    mean_batch_size: float | None
    model_version: str | None
    restarted: bool


def service_window(previous: Scrape | None, current: Scrape) -> ServiceWindow:
    """Deltas between two scrapes. A counter that went down means the service restarted in
    between: the current values are then the counts since that restart."""
    prev = previous or Scrape(taken_at=current.taken_at)
    prev_buckets = dict(prev.latency_buckets)
    restarted = previous is not None and (
        current.requests < prev.requests
        or current.generated_tokens < prev.generated_tokens
        or current.batch_count < prev.batch_count
        or any(n < prev_buckets.get(le, 0.0) for le, n in current.latency_buckets)
    )
    if restarted:
        prev, prev_buckets = Scrape(taken_at=prev.taken_at), {}
    seconds = max(current.taken_at - prev.taken_at, 1e-9)
    requests = current.requests - prev.requests
    errors = current.server_errors - prev.server_errors
    buckets = tuple((le, n - prev_buckets.get(le, 0.0)) for le, n in current.latency_buckets)
    batches = current.batch_count - prev.batch_count
    return ServiceWindow(
        seconds=round(seconds, 1),
        requests=requests,
        server_errors=errors,
        error_rate=errors / requests if requests else 0.0,
        request_rate=requests / seconds,
        p50_s=histogram_quantile(0.5, buckets),
        p95_s=histogram_quantile(0.95, buckets),
        p99_s=histogram_quantile(0.99, buckets),
        tokens_per_s=(current.generated_tokens - prev.generated_tokens) / seconds,
        mean_batch_size=(current.batch_size_sum - prev.batch_size_sum) / batches
        if batches
        else None,
        model_version=current.model_version,
        restarted=restarted,
    )
