"""The monitor's checks over service, feedback and drift figures, and the `RetrainDecision`.

Every check is a plain function over plain data, so each one is tested on recorded fixtures;
`flows/monitor.py` only fetches the inputs, keeps the state between runs and acts on the decision.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from components.config import MonitorConfig
from components.domain import DomainModel
from components.inference.records import Answer
from components.monitor.drift import DriftReport, prompt_drift
from components.monitor.feedback import FeedbackWindow, feedback_window
from components.monitor.scrape import Scrape, ServiceWindow, service_window
from components.monitor.state import MonitorState


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


def memory_check(waiting: int | None, config: MonitorConfig) -> Check:
    """Corrections the memory serves that the champion's weights were not trained on."""
    name = "corrections waiting in the memory"
    limit = config.memory_corrections_to_retrain
    if waiting is None or limit is None:
        return Check(name, None, "off", False, "the memory or this check is off")
    detail = f"{waiting} served corrections accepted after the champion was registered"
    return Check(name, waiting, f">= {limit}", waiting >= limit, detail)


def drift_checks(drift: DriftReport | None, live: int, config: MonitorConfig) -> list[Check]:
    if drift is None:
        detail = f"only {live} live prompts (< {config.min_prompts}), not judged"
        return [
            Check("prompt length drift (KS)", None, f"> {config.max_length_ks:g}", False, detail),
            Check("prompt text drift (AUC)", None, f"> {config.max_domain_auc:g}", False, detail),
        ]
    terms = ", ".join(drift.live_terms[:6]) or "none"
    routed = (
        ""
        if drift.out_of_domain_share is None
        else f"; {drift.out_of_domain_share:.0%} outside the champion's domain (the router's view)"
    )
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
            f"{drift.live} live vs {drift.reference} training prompts; live terms: {terms}{routed}",
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
    memory_waiting: int | None = None  # None: the memory is off
    domain: DomainModel | None = None  # the router's, when the service routes


def assess(
    signals: Signals,
    state: MonitorState,
    config: MonitorConfig,
    retrain_running: str | None = None,
    seed: int = 0,
) -> RetrainDecision:
    """Every check on the signals, then the decision (cooldown and running retrains applied)."""
    previous = Scrape.from_dict(state.last_scrape) if state.last_scrape else None
    service = service_window(previous, signals.scrape) if signals.scrape else None
    version = (service.model_version if service else None) or signals.champion_version
    feedback = feedback_window(signals.rated, signals.rated_before, version, config)
    live = [a.prompt for a in signals.answers if a.prompt.strip()]
    drift = None
    if len(live) >= config.min_prompts and len(signals.reference_prompts) >= 2:
        drift = prompt_drift(signals.reference_prompts, live, seed, signals.domain)
    baseline = state.latency_baselines.get(version or "")
    checks = [
        *service_checks(service, signals.unreachable, baseline, config),
        feedback_check(feedback, config),
        *drift_checks(drift, len(live), config),
        memory_check(signals.memory_waiting, config),
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
    state: MonitorState,
    signals: Signals,
    decision: RetrainDecision,
    config: MonitorConfig,
    acting: bool = True,
) -> MonitorState:
    """The state after this run: its scrape, its time, the latency baseline, and the retrain
    if it starts one (`acting`: a run that only reports starts no cooldown)."""
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
        last_retrain_at=signals.now if decision.retrain and acting else state.last_retrain_at,
        latency_baselines=baselines,
    )
