"""The verdict on a canary: its answers against the champion's on the same window (since the
canary began), with the statistics the monitor's feedback check uses.

Rolled back when its thumbs-down rate is significantly higher than the champion's (Fisher's
exact test, one-sided, at `monitor.significance`; against `monitor.baseline_down_rate` while the
champion has no ratings in the window) or its p95 latency is more than
`canary.max_latency_factor` times the champion's; promoted once `canary.min_feedback` of its
answers are rated with neither; otherwise it waits. Only the models' own answers count: a
correction from the memory or the scope reply is neither side's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from components.config import CanaryConfig, MonitorConfig
from components.inference.records import Answer
from components.monitor.feedback import down_rate_p_value, down_rate_p_value_vs_rate

Action = Literal["promote", "roll back", "wait"]


@dataclass(frozen=True)
class Side:
    """One model's answers in the window."""

    version: str
    answers: int
    rated: int
    down: int
    p95_latency_ms: float | None

    @property
    def down_rate(self) -> float:
        return self.down / self.rated if self.rated else 0.0

    def ratings(self) -> str:
        return f"{self.down_rate:.0%} thumbs-down ({self.down}/{self.rated})"


@dataclass(frozen=True)
class CanaryVerdict:
    action: Action
    reason: str
    canary: Side
    champion: Side
    p_value: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def side(answers: list[Answer], version: str) -> Side:
    own = [
        a
        for a in answers
        if a.model_version == version and a.memory_entry is None and a.route != "scope"
    ]
    rated = [a for a in own if a.rating]
    latencies = [a.latency_ms for a in own]
    return Side(
        version=version,
        answers=len(own),
        rated=len(rated),
        down=sum(a.rating == "down" for a in rated),
        p95_latency_ms=float(np.percentile(latencies, 95)) if latencies else None,
    )


def judge_canary(
    answers: list[Answer],
    canary_version: str,
    champion_version: str,
    canary: CanaryConfig,
    monitor: MonitorConfig,
) -> CanaryVerdict:
    """Promote, roll back or wait, with the reason in words."""
    new, old = side(answers, canary_version), side(answers, champion_version)
    p_value = None
    if new.rated:
        p_value = (
            down_rate_p_value(new.down, new.rated, old.down, old.rated)
            if old.rated
            else down_rate_p_value_vs_rate(new.down, new.rated, monitor.baseline_down_rate)
        )
    against = (
        f"the champion's {old.ratings()}"
        if old.rated
        else f"the baseline {monitor.baseline_down_rate:.0%} (no champion ratings yet)"
    )

    def verdict(action: Action, reason: str) -> CanaryVerdict:
        return CanaryVerdict(action, reason, new, old, p_value)

    if p_value is not None and p_value < monitor.significance:
        return verdict(
            "roll back",
            f"canary v{canary_version}: {new.ratings()}, significantly above {against} "
            f"(p={p_value:.3g} < {monitor.significance:g})",
        )
    timed = new.answers >= canary.min_requests and old.answers >= canary.min_requests
    latency = ""
    if timed and new.p95_latency_ms is not None and old.p95_latency_ms is not None:
        factor = new.p95_latency_ms / max(old.p95_latency_ms, 1e-9)
        latency = (
            f"p95 latency {new.p95_latency_ms:.0f} ms vs the champion's "
            f"{old.p95_latency_ms:.0f} ms ({factor:.2f}x)"
        )
        if factor > canary.max_latency_factor:
            return verdict(
                "roll back",
                f"canary v{canary_version}: {latency}, over {canary.max_latency_factor:g}x",
            )
    if new.rated < canary.min_feedback:
        return verdict(
            "wait",
            f"canary v{canary_version}: {new.rated} of {canary.min_feedback} ratings needed "
            f"({new.answers} answers so far)",
        )
    shown = f"p={p_value:.3g}" if p_value is not None else "no test"
    return verdict(
        "promote",
        f"canary v{canary_version}: {new.ratings()}, not significantly above {against} "
        f"({shown}); " + (latency or "latency not compared (too few answers)"),
    )
