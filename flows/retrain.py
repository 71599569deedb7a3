"""Starting a retrain from the monitor, and what Prefect knows of retrains already under way."""

from __future__ import annotations

from typing import Any, Literal

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from components.config import PipelineConfig
from components.monitor.lock import retrain_lock
from flows.training_pipeline import training_pipeline

RetrainMode = Literal["auto", "deployment", "in-process", "off"]


def running_retrain(deployment: str) -> str | None:
    """A description of a retrain that is still waiting to start or running, if any."""
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


def start_retrain(profile: str, config: PipelineConfig, mode: RetrainMode, wait: bool) -> dict:
    """Start the training pipeline that deploys what it promotes: the deployment
    `training-pipeline/<profile>` when it exists (`mode` auto or deployment), else this
    process under the retrain lock."""
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
    with retrain_lock(config.registry.model_name) as acquired:
        if not acquired:
            return {"how": "skipped", "why": "another retrain holds the lock"}
        summary = training_pipeline(profile=profile, deploy_if_promoted=True)
    return {"how": "in-process", "summary": summary}
