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
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from components.config import PipelineConfig, load_profile
from components.data.curated import curate, summary, user_corrections
from components.domain import DomainModel
from components.inference_store import InferenceStore
from components.memory.store import CorrectionMemory
from components.model.embedding import sentence_embedder
from components.monitor.canary import judge_canary
from components.monitor.decision import RetrainDecision, Signals, assess, next_state
from components.monitor.pushed import report_decision
from components.monitor.scrape import Scrape, ScrapeError, scrape
from components.monitor.state import MonitorState
from components.paths import curated_dir, monitor_dir
from components.registry.aliases import CANARY, current_champion, version_at
from components.registry.register import training_prompts
from components.registry.tracking import RunLogger
from components.serving.deploy import DeployError, end_canary
from components.settings import settings
from flows.deploy import deploy
from flows.reports import slug
from flows.training_pipeline import training_pipeline

RetrainMode = Literal["auto", "deployment", "in-process", "off"]


@task
def review_canary(config: PipelineConfig, url: str) -> dict[str, Any] | None:
    """The canary's verdict (None: no canary), acted on: a promoted canary is deployed as
    champion (the deploy flow: swap, smoke test, memory), a rolled-back one withdrawn."""
    from urllib.parse import urlparse

    name = config.registry.model_name
    canary, champion = version_at(name, CANARY), current_champion(name)
    if canary is None or champion is None:
        return None
    since = float(canary.tags.get("canary.started_at", canary.creation_timestamp / 1000))
    with InferenceStore() as store:
        answers = store.answers_since(since)
    verdict = judge_canary(
        answers, str(canary.version), str(champion.version), config.serve.canary, config.monitor
    )
    get_run_logger().info("canary: %s (%s)", verdict.action, verdict.reason)
    outcome: dict[str, Any] = verdict.to_dict()
    if verdict.action == "wait":
        return outcome
    decision, reason = "rolled back", verdict.reason
    if verdict.action == "promote":
        try:
            port = urlparse(url).port or config.serve.port
            deploy(name, str(canary.version), config, str(champion.version), port=port)
            decision = "promoted"
        except DeployError as exc:
            reason = f"{verdict.reason}; promotion failed: {exc}"
    outcome["done"] = end_canary(name, str(canary.version), url, decision, reason)
    outcome["decision"] = decision
    create_markdown_artifact(
        f"## Canary v{canary.version}: {decision}\n- {reason}\n- {outcome['done']}",
        key=f"canary-{slug(config.name)}",
        description="Canary verdict",
    )
    return outcome


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
def read_metrics(url: str) -> Scrape:
    return scrape(url)


@task
def reference_prompts(config: PipelineConfig) -> tuple[list[str], str | None]:
    """The champion's training prompts (logged with its run), and the champion's version."""
    from mlflow.exceptions import MlflowException

    champion = current_champion(config.registry.model_name)
    if champion is None:
        return [], None
    try:
        return training_prompts(champion.run_id), str(champion.version)
    except MlflowException as exc:  # a version registered from a run that logged no data
        get_run_logger().warning("no training prompts for the champion's domain: %s", exc)
        return [], str(champion.version)


@task
def gather(config: PipelineConfig, state: MonitorState, url: str) -> Signals:
    now = time.time()
    since = state.last_run_at or now - config.monitor.interval_minutes * 60
    current, unreachable = None, None
    try:
        current = read_metrics(url)
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


def routing_domain(config: PipelineConfig, prompts: list[str]) -> DomainModel | None:
    """The router's domain of the champion, so the drift check reports what the router does
    with the live prompts (None when the service does not route)."""
    routing = config.serve.routing
    if not routing.enabled or not prompts:
        return None

    embedder = sentence_embedder(config.memory.embedding_model)
    return DomainModel(prompts, embedder, routing.min_similarity)


def corrections_waiting(config: PipelineConfig) -> int | None:
    """Served memory entries accepted after the champion was registered (None: memory off)."""
    if not config.memory.enabled:
        return None
    champion = current_champion(config.registry.model_name)
    since = champion.creation_timestamp / 1000 if champion else 0.0
    memory = CorrectionMemory(config.memory)
    try:
        return sum(entry.accepted_at > since for entry in memory.served())
    finally:
        memory.close()


def running_retrain(deployment: str) -> str | None:
    """A description of a retrain that is still waiting to start or running, if any."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            found = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            return None
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[found.id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(
                    type=FlowRunFilterStateType(
                        any_=[StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]
                    )
                )
            ),
            limit=1,
        )
    if not runs:
        return None
    state = runs[0].state.name if runs[0].state else "pending"
    return f"{deployment} run '{runs[0].name}' is {state}"


@contextmanager
def retrain_lock(config: PipelineConfig):  # -> Iterator[bool]
    """An exclusive lock on this machine, held while a retrain runs in-process."""
    import fcntl

    path = monitor_dir() / f"{config.registry.model_name}.retrain.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def lock_is_held(config: PipelineConfig) -> bool:
    with retrain_lock(config) as acquired:
        return not acquired


@task
def curate_feedback(config: PipelineConfig, since: float) -> dict[str, Any]:
    """Corrections users sent with `/feedback` join the curated data before a retrain."""
    result = curate(config, user_corrections(config, since))
    folder = curated_dir(config.data.feedback_dir)
    total = sum(summary(folder).values())
    return {"new": result.written, "skipped": result.skipped, "total": total, "folder": str(folder)}


def start_retrain(profile: str, config: PipelineConfig, mode: RetrainMode, wait: bool) -> dict:
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    logger = get_run_logger()
    deployment = f"training-pipeline/{config.name}"
    parameters = {"profile": profile, "deploy_if_promoted": True}
    if mode in ("auto", "deployment"):
        try:
            run = run_deployment(deployment, parameters=parameters, timeout=None if wait else 0)
            state = run.state.name if run.state else "SCHEDULED"
            logger.info("started %s as flow run '%s' (%s)", deployment, run.name, state)
            result: dict[str, Any] = {"how": "deployment", "flow_run": run.name, "state": state}
            if wait and run.state is not None and run.state.is_completed():
                result["summary"] = run.state.result(raise_on_failure=False)
            return result
        except ObjectNotFound:
            if mode == "deployment":
                raise
            logger.info("no deployment %s: training in this process", deployment)
    with retrain_lock(config) as acquired:
        if not acquired:
            return {"how": "skipped", "why": "another retrain holds the lock"}
        summary = training_pipeline(profile=profile, deploy_if_promoted=True)
    return {"how": "in-process", "summary": summary}


def publish(config: PipelineConfig, decision: RetrainDecision) -> None:
    create_markdown_artifact(
        decision.markdown(), key=f"monitor-{slug(config.name)}", description="Retrain decision"
    )
    create_table_artifact(
        [
            {
                "check": c.name,
                "value": None if c.value is None else round(c.value, 4),
                "threshold": c.threshold,
                "triggered": c.triggered,
                "detail": c.detail,
            }
            for c in decision.checks
        ],
        key=f"monitor-checks-{slug(config.name)}",
        description=decision.summary,
    )


def log_to_mlflow(config: PipelineConfig, decision: RetrainDecision) -> str:
    run = RunLogger.start(
        f"{config.registry.experiment}-monitor",
        run_name=f"monitor-{config.name}-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={
            "profile": config.name,
            "model_name": config.registry.model_name,
            "model_version": decision.model_version or "none",
            "retrain": str(decision.retrain).lower(),
            "summary": decision.summary[:5000],
        },
    )
    data = decision.to_dict()
    figures = {k: data[k] for k in ("service", "feedback", "drift") if data[k]}
    run.metrics({**figures, "retrain": int(decision.retrain)})
    run.json(data, "decision.json")
    run.finish()
    return run.run_id


def emit_retrain_event(config: PipelineConfig, decision: RetrainDecision) -> None:
    from prefect.events import emit_event

    emit_event(
        event="flywheel.retrain.triggered",
        resource={
            "prefect.resource.id": f"flywheel.model.{config.registry.model_name}",
            "prefect.resource.name": config.registry.model_name,
            "flywheel.profile": config.name,
        },
        payload={
            "summary": decision.summary,
            "model_version": decision.model_version,
            "reasons": [
                {"check": c.name, "value": c.value, "threshold": c.threshold, "detail": c.detail}
                for c in decision.reasons
            ],
        },
    )


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
    if running is None and lock_is_held(config):
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


def describe(decision: dict[str, Any]) -> str:
    """A decision (as returned by the flow) for the terminal: verdict, then every check."""
    lines = [
        f"decision: {'RETRAIN' if decision['retrain'] else 'no retrain'}",
        decision["summary"],
    ]
    for check in decision["checks"]:
        value = "n/a" if check["value"] is None else f"{check['value']:.3g}"
        mark = "!!" if check["triggered"] else "ok"
        lines.append(
            f"  [{mark}] {check['name']}: {value} ({check['threshold']}) {check['detail']}"
        )
    return "\n".join(lines)


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
