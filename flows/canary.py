"""The canary's review, the first step of each monitor cycle while a canary serves: compare it
with the champion on the same window, then promote it (the deploy flow) or roll it back,
recording why on the version like the gate does (components/monitor/canary.py judges)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from components.config import PipelineConfig
from components.inference.store import InferenceStore
from components.monitor.canary import judge_canary
from components.registry.aliases import CANARY, current_champion, version_at
from components.serving.deploy import DeployError, end_canary
from flows.deploy import deploy
from flows.reports import slug


@task
def review_canary(config: PipelineConfig, url: str) -> dict[str, Any] | None:
    """The canary's verdict (None: no canary), acted on: a promoted canary is deployed as
    champion (the deploy flow: swap, smoke test, memory), a rolled-back one withdrawn."""
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
