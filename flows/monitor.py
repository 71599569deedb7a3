"""Monitor flow: read the service's metrics, the users' feedback and the live prompts, decide
whether to retrain, say why, and start the retrain.

    python -m flows.monitor --profile cpu-small

or the scheduled deployment `monitor/<profile>` (see prefect.yaml). A retrain starts the
`training-pipeline/<profile>` deployment (`run_deployment`), or, when no such deployment
exists, runs the training flow in this process. Either way the new version is deployed to the
running service if the gate promotes it. A cooldown and a lock keep retrains one at a time.

While a canary serves (`serve.canary`), each cycle first compares it with the champion on the
same window and promotes it or rolls it back (components/monitor/canary.py), recording why on
the version like the gate does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, task

from components.config import PipelineConfig, load_profile
from components.data.curated import curate, summary, user_corrections
from components.inference.store import InferenceStore
from components.monitor.decision import Signals, assess, next_state
from components.monitor.lock import lock_is_held
from components.monitor.pushed import report_decision
from components.monitor.scrape import Scrape, ScrapeError, scrape, scrape_fleet
from components.monitor.signals import corrections_waiting, reference_prompts, routing_domain
from components.monitor.state import MonitorState
from components.paths import curated_dir, monitor_dir
from components.settings import settings
from flows.canary import review_canary
from flows.reports import describe, emit_retrain_event, log_to_mlflow, publish
from flows.retrain import RetrainMode, running_retrain, start_retrain


def service_url(config: PipelineConfig) -> str:
    """`FLYWHEEL_SERVICE_URL`, else the profile's `monitor.service_url`, else localhost."""
    return (
        settings().service_url
        or config.monitor.service_url
        or f"http://127.0.0.1:{config.serve.port}"
    )


def state_path(config: PipelineConfig) -> Path:
    return monitor_dir() / f"{config.registry.model_name}.json"


@task(retries=2, retry_delay_seconds=[2, 5])
def read_metrics(config: PipelineConfig, url: str) -> Scrape:
    """The fleet's metrics from Prometheus (every replica, summed) when the profile names one
    (`monitor.prometheus_url`), else the one service's."""
    monitor = config.monitor
    if monitor.prometheus_url:
        return scrape_fleet(monitor.prometheus_url, monitor.prometheus_job)
    return scrape(url)


@task
def gather(config: PipelineConfig, state: MonitorState, url: str) -> Signals:
    now = time.time()
    since = state.last_run_at or now - config.monitor.interval_minutes * 60
    current, unreachable = None, None
    try:
        current = read_metrics(config, url)
    except ScrapeError as exc:
        unreachable = str(exc)
    with InferenceStore() as store:
        answers = store.answers_since(since, until=now)
        rated = store.answers_since(since, until=now, rated=True)
        rated_before = store.answers_since(0, until=since, rated=True)
    prompts, champion = reference_prompts(config)
    waiting = corrections_waiting(config)
    return Signals(
        now,
        current,
        unreachable,
        answers,
        rated,
        rated_before,
        prompts,
        champion,
        waiting,
        routing_domain(config, prompts),
    )


@task
def curate_feedback(config: PipelineConfig, since: float) -> dict[str, Any]:
    """Corrections users sent with `/feedback` join the curated data before a retrain."""
    corrections = user_corrections(config, since)
    result = curate(config, corrections.items, corrections.policy)
    folder = curated_dir(config.data.feedback_dir)
    total = sum(summary(folder).values())
    return {
        "new": result.written,
        "skipped": result.skipped,
        "policy": corrections.policy,
        "total": total,
        "folder": str(folder),
    }


@flow(name="monitor", log_prints=True)
def monitor(
    profile: str = "cpu-small",
    retrain: RetrainMode = "auto",
    wait_for_retrain: bool = False,
) -> dict:
    """One monitoring cycle: checks -> decision (artifact, MLflow, event) -> retrain."""
    config = load_profile(profile)
    path = state_path(config)
    state = MonitorState.load(path)
    url = service_url(config)
    canary = review_canary(config, url) if config.serve.canary.enabled else None
    signals = gather(config, state, url)
    running = running_retrain(f"training-pipeline/{config.name}")
    if running is None and lock_is_held(config.registry.model_name):
        running = "a retrain is running in-process on this machine"
    decision = assess(signals, state, config.monitor, retrain_running=running)
    next_state(state, signals, decision, config.monitor, acting=retrain != "off").save(path)
    publish(config, decision)
    report_decision(config, decision.retrain)
    mlflow_run = log_to_mlflow(config, decision)
    print(decision.summary)
    outcome: dict[str, Any] = {
        "decision": decision.to_dict(),
        "mlflow_run_id": mlflow_run,
        "service_url": url,
        "canary": canary,
    }
    if decision.retrain:
        emit_retrain_event(config, decision)
        outcome["curated"] = curate_feedback(config, state.last_run_at or 0.0)
        if retrain != "off":
            outcome["retrain"] = start_retrain(profile, config, retrain, wait_for_retrain)
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.monitor", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--profile", default="cpu-small")
    parser.add_argument(
        "--retrain",
        choices=["auto", "deployment", "in-process", "off"],
        default="auto",
        help="how to retrain when the decision says so (auto: the deployment if it exists)",
    )
    parser.add_argument("--wait", action="store_true", help="wait for the retrain to finish")
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON")
    args = parser.parse_args(argv)
    outcome = monitor(profile=args.profile, retrain=args.retrain, wait_for_retrain=args.wait)
    if args.json:
        print(json.dumps(outcome, indent=1, default=str))
    else:
        if canary := outcome["canary"]:
            print(f"canary: {canary.get('decision', 'wait')}: {canary['reason']}")
        print(describe(outcome["decision"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
