"""The monitor's checks: service metrics, user feedback and prompt drift -> `RetrainDecision`.

Every check is a plain function over plain data (a `/metrics` text, rows of the inference log,
two lists of prompts), so each one is tested on recorded fixtures; `flows/monitor.py` only
fetches the inputs, keeps the state between runs and acts on the decision.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from components.config import MonitorConfig
from components.drift import DriftReport
from components.inference_store import Answer

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


@dataclass(frozen=True)
class FeedbackWindow:
    """Ratings of one model version's answers in the window, against that version's baseline."""

    model_version: str | None
    rated: int
    down: int
    corrections: int
    down_rate: float
    baseline_rate: float
    baseline_rated: int  # 0: the profile's `baseline_down_rate` stands in for history
    p_value: float | None


def down_rate_p_value(down: int, rated: int, baseline_down: int, baseline_rated: int) -> float:
    """One-sided p-value that the window's thumbs-down rate is above the baseline's.

    Fisher's exact test against the version's own earlier ratings."""
    from scipy.stats import fisher_exact

    table = [[down, rated - down], [baseline_down, baseline_rated - baseline_down]]
    return float(fisher_exact(table, alternative="greater").pvalue)


def down_rate_p_value_vs_rate(down: int, rated: int, rate: float) -> float:
    """One-sided exact binomial p-value of `down` of `rated` against a fixed rate."""
    from scipy.stats import binomtest

    return float(binomtest(down, rated, rate, alternative="greater").pvalue)


def feedback_window(
    window: list[Answer], history: list[Answer], version: str | None, config: MonitorConfig
) -> FeedbackWindow:
    """Thumbs-down rate of `version` in the window vs its history (or the profile's baseline)."""
    rated = [a for a in window if a.rating and (version is None or a.model_version == version)]
    past = [a for a in history if a.rating and (version is None or a.model_version == version)]
    down = sum(a.rating == "down" for a in rated)
    past_down = sum(a.rating == "down" for a in past)
    own_baseline = len(past) >= config.min_feedback
    baseline_rate = past_down / len(past) if own_baseline else config.baseline_down_rate
    p_value = None
    if rated:
        p_value = (
            down_rate_p_value(down, len(rated), past_down, len(past))
            if own_baseline
            else down_rate_p_value_vs_rate(down, len(rated), config.baseline_down_rate)
        )
    return FeedbackWindow(
        model_version=version,
        rated=len(rated),
        down=down,
        corrections=sum(bool(a.correction) for a in rated),
        down_rate=down / len(rated) if rated else 0.0,
        baseline_rate=baseline_rate,
        baseline_rated=len(past) if own_baseline else 0,
        p_value=p_value,
    )


@dataclass(frozen=True)
class Check:
    """One signal: its figure, the threshold it is held to, and whether it calls for a retrain."""

    name: str
    value: float | None
    threshold: str
    triggered: bool
    detail: str


@dataclass
class RetrainDecision:
    retrain: bool
    summary: str
    checks: list[Check]
    model_version: str | None
    decided_at: float
    blocked_by: str | None = None
    service: ServiceWindow | None = None
    feedback: FeedbackWindow | None = None
    drift: DriftReport | None = None

    @property
    def reasons(self) -> list[Check]:
        return [c for c in self.checks if c.triggered]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> str:
        verdict = "**Retrain**" if self.retrain else "**No retrain**"
        lines = [
            f"# Monitor: {verdict}",
            "",
            self.summary,
            "",
            "| check | value | threshold | triggered | detail |",
            "|---|---|---|---|---|",
        ]
        for c in self.checks:
            value = "n/a" if c.value is None else f"{c.value:.4g}"
            mark = "yes" if c.triggered else "no"
            lines.append(f"| {c.name} | {value} | {c.threshold} | {mark} | {c.detail} |")
        return "\n".join(lines)


def _fmt(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:.2f} s"


def service_checks(
    service: ServiceWindow | None,
    unreachable: str | None,
    latency_baseline: float | None,
    config: MonitorConfig,
) -> list[Check]:
    if service is None:
        reason = unreachable or "no scrape"
        return [Check("service", None, "reachable", False, f"not checked: {reason}")]
    enough = service.requests >= config.min_requests
    few = f"only {service.requests:.0f} requests (< {config.min_requests}), not judged"
    checks = [
        Check(
            "5xx error rate",
            service.error_rate,
            f"> {config.max_error_rate:.0%}",
            enough and service.error_rate > config.max_error_rate,
            f"{service.server_errors:.0f} of {service.requests:.0f} requests" if enough else few,
        )
    ]
    if config.max_p95_latency_s is not None:
        checks.append(
            Check(
                "p95 latency",
                service.p95_s,
                f"> {config.max_p95_latency_s:.2f} s",
                enough and service.p95_s is not None and service.p95_s > config.max_p95_latency_s,
                f"p50 {_fmt(service.p50_s)}, p99 {_fmt(service.p99_s)}" if enough else few,
            )
        )
    if latency_baseline is None:
        detail = "no baseline yet for this version" + ("" if enough else f"; {few}")
        checks.append(Check("p95 latency regression", service.p95_s, "n/a", False, detail))
    else:
        limit = latency_baseline * config.latency_regression_factor
        checks.append(
            Check(
                "p95 latency regression",
                service.p95_s,
                f"> {config.latency_regression_factor:g}x baseline {latency_baseline:.2f} s "
                f"= {limit:.2f} s",
                enough and service.p95_s is not None and service.p95_s > limit,
                f"p50 {_fmt(service.p50_s)}, p99 {_fmt(service.p99_s)}" if enough else few,
            )
        )
    return checks


def feedback_check(feedback: FeedbackWindow, config: MonitorConfig) -> Check:
    baseline = (
        f"{feedback.baseline_rate:.0%} over {feedback.baseline_rated} earlier ratings"
        if feedback.baseline_rated
        else f"profile baseline {feedback.baseline_rate:.0%}"
    )
    threshold = f"above {baseline}, p < {config.significance:g}"
    if feedback.rated < config.min_feedback:
        detail = f"only {feedback.rated} ratings (< {config.min_feedback}), not judged"
        return Check("thumbs-down rate", feedback.down_rate, threshold, False, detail)
    p = feedback.p_value if feedback.p_value is not None else 1.0
    return Check(
        "thumbs-down rate",
        feedback.down_rate,
        threshold,
        feedback.down_rate > feedback.baseline_rate and p < config.significance,
        f"{feedback.down} of {feedback.rated} down (p = {p:.2g}), "
        f"{feedback.corrections} corrections",
    )


def drift_checks(drift: DriftReport | None, live: int, config: MonitorConfig) -> list[Check]:
    if drift is None:
        detail = f"only {live} live prompts (< {config.min_prompts}), not judged"
        return [
            Check("prompt length drift (KS)", None, f"> {config.max_length_ks:g}", False, detail),
            Check("prompt text drift (AUC)", None, f"> {config.max_domain_auc:g}", False, detail),
        ]
    terms = ", ".join(drift.live_terms[:6]) or "none"
    return [
        Check(
            "prompt length drift (KS)",
            drift.length_ks,
            f"> {config.max_length_ks:g} and p < {config.significance:g}",
            drift.length_ks > config.max_length_ks and drift.length_p_value < config.significance,
            f"median {drift.median_words_live:g} words live vs "
            f"{drift.median_words_reference:g} trained (p = {drift.length_p_value:.2g})",
        ),
        Check(
            "prompt text drift (AUC)",
            drift.domain_auc,
            f"> {config.max_domain_auc:g}",
            drift.domain_auc > config.max_domain_auc,
            f"{drift.live} live vs {drift.reference} training prompts; live terms: {terms}",
        ),
    ]


def decide(
    checks: list[Check],
    config: MonitorConfig,
    now: float,
    last_retrain_at: float | None,
    retrain_running: str | None = None,
) -> tuple[bool, str, str | None]:
    """(retrain, summary, blocked_by) from the checks, the cooldown and any running retrain."""
    reasons = [c for c in checks if c.triggered]
    if not reasons:
        return False, "All checks within their thresholds.", None
    why = "; ".join(
        f"{c.name} {c.value:.3g} ({c.threshold})" if c.value is not None else c.name
        for c in reasons
    )
    if retrain_running:
        return False, f"Would retrain ({why}), but {retrain_running}.", retrain_running
    cooldown_s = config.cooldown_minutes * 60
    if last_retrain_at is not None and now - last_retrain_at < cooldown_s:
        until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last_retrain_at + cooldown_s))
        blocked = f"cooldown: last retrain {(now - last_retrain_at) / 60:.0f} min ago, next {until}"
        return False, f"Would retrain ({why}), but in {blocked}.", blocked
    return True, f"Retrain: {why}.", None


@dataclass
class MonitorState:
    """What one monitor run leaves for the next (a JSON file under `$FLYWHEEL_HOME/monitor`)."""

    last_run_at: float | None = None
    last_scrape: dict[str, Any] | None = None
    last_retrain_at: float | None = None
    latency_baselines: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> MonitorState:
        if not path.is_file():
            return cls()
        return cls(**json.loads(path.read_text(encoding="utf-8")))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1), encoding="utf-8")
        tmp.replace(path)  # a crash mid-write never leaves a half file


@dataclass(frozen=True)
class Signals:
    """Everything one monitor run looks at, already fetched."""

    now: float
    scrape: Scrape | None
    unreachable: str | None
    answers: list[Answer]  # generations logged in the window: their prompts are the live ones
    rated: list[Answer]  # answers rated in the window
    rated_before: list[Answer]  # answers rated before the window: the baseline
    reference_prompts: list[str]
    champion_version: str | None = None


def assess(
    signals: Signals,
    state: MonitorState,
    config: MonitorConfig,
    retrain_running: str | None = None,
    seed: int = 0,
) -> RetrainDecision:
    """Every check on the signals, then the decision (cooldown and running retrains applied)."""
    from components.drift import prompt_drift

    previous = Scrape.from_dict(state.last_scrape) if state.last_scrape else None
    service = service_window(previous, signals.scrape) if signals.scrape else None
    version = (service.model_version if service else None) or signals.champion_version
    feedback = feedback_window(signals.rated, signals.rated_before, version, config)
    live = [a.prompt for a in signals.answers if a.prompt.strip()]
    drift = None
    if len(live) >= config.min_prompts and len(signals.reference_prompts) >= 2:
        drift = prompt_drift(signals.reference_prompts, live, seed)
    baseline = state.latency_baselines.get(version or "")
    checks = [
        *service_checks(service, signals.unreachable, baseline, config),
        feedback_check(feedback, config),
        *drift_checks(drift, len(live), config),
    ]
    retrain, summary, blocked = decide(
        checks, config, signals.now, state.last_retrain_at, retrain_running
    )
    return RetrainDecision(
        retrain=retrain,
        summary=summary,
        checks=checks,
        model_version=version,
        decided_at=signals.now,
        blocked_by=blocked,
        service=service,
        feedback=feedback,
        drift=drift,
    )


def next_state(
    state: MonitorState, signals: Signals, decision: RetrainDecision, config: MonitorConfig
) -> MonitorState:
    """The state after this run: its scrape, its time, the latency baseline, the retrain."""
    baselines = dict(state.latency_baselines)
    service = decision.service
    latency_ok = not any(c.triggered and "latency" in c.name for c in decision.checks)
    if (
        service is not None
        and service.model_version
        and service.model_version not in baselines
        and service.p95_s is not None
        and service.requests >= config.min_requests
        and latency_ok
    ):
        baselines[service.model_version] = service.p95_s  # the version's first judged window
    return MonitorState(
        last_run_at=signals.now,
        last_scrape=signals.scrape.to_dict() if signals.scrape else state.last_scrape,
        last_retrain_at=signals.now if decision.retrain else state.last_retrain_at,
        latency_baselines=baselines,
    )
