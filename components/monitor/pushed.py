"""What the flows tell Prometheus: each retrain's outcome and each monitor decision.

Flow runs are batch jobs that end before a scrape could find them, so they push to a
Prometheus Pushgateway when one is configured (`monitor.pushgateway_url`, or the
`FLYWHEEL_PUSHGATEWAY_URL` environment variable). The series carry the profile as a label;
the alert `FlywheelRetrainFailed` and the dashboard's monitor panel read them. A Pushgateway
that does not answer is logged and never fails the flow that reports to it.
"""

from __future__ import annotations

import logging
import time

from components.config import PipelineConfig
from components.settings import settings

PUSH_JOB = "flywheel-flows"  # the `job` label of every pushed series
RETRAIN_SUCCESS = "flywheel_retrain_last_success_timestamp_seconds"
RETRAIN_FAILURE = "flywheel_retrain_last_failure_timestamp_seconds"
MONITOR_RUN = "flywheel_monitor_last_run_timestamp_seconds"
MONITOR_DECISION = "flywheel_monitor_retrain_decision"

log = logging.getLogger(__name__)


def pushgateway_url(config: PipelineConfig) -> str | None:
    return settings().pushgateway_url or config.monitor.pushgateway_url


def push(config: PipelineConfig, gauges: dict[str, tuple[str, float]]) -> bool:
    """Set `gauges` ({name: (help, value)}) in the profile's group; other series of the
    group keep their values. Returns whether the Pushgateway took them."""
    url = pushgateway_url(config)
    if url is None:
        return False
    from prometheus_client import CollectorRegistry, Gauge, pushadd_to_gateway

    registry = CollectorRegistry()
    for name, (doc, value) in gauges.items():
        Gauge(name, doc, registry=registry).set(value)
    try:
        pushadd_to_gateway(
            url, job=PUSH_JOB, grouping_key={"profile": config.name}, registry=registry, timeout=5
        )
    except OSError as exc:  # URLError and timeouts: the flow goes on
        log.warning("could not push %s to the Pushgateway at %s: %s", sorted(gauges), url, exc)
        return False
    return True


def report_retrain(config: PipelineConfig, succeeded: bool) -> bool:
    """A training-pipeline run of `config` ended, well or not."""
    if succeeded:
        gauge = (RETRAIN_SUCCESS, "When the last training-pipeline run completed.")
    else:
        gauge = (RETRAIN_FAILURE, "When the last training-pipeline run failed or crashed.")
    return push(config, {gauge[0]: (gauge[1], time.time())})


def report_decision(config: PipelineConfig, retrain: bool) -> bool:
    """A monitor run decided to retrain (1) or not (0)."""
    return push(
        config,
        {
            MONITOR_RUN: ("When the monitor last ran.", time.time()),
            MONITOR_DECISION: ("The monitor's last decision: 1 retrain, 0 keep.", float(retrain)),
        },
    )
