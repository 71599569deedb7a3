"""Thumbs-down statistics of one model version's answers in a window."""

from __future__ import annotations

from dataclasses import dataclass

from components.config import MonitorConfig
from components.inference.records import Answer


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
