"""Register stage: an MLflow model version with lineage, `challenger`, and the gate."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from components.evaluate.evaluation import EvalResult
from components.model.base_model import BaseModelRef
from components.paths import tracking_uri
from components.registry.aliases import CHAMPION
from components.registry.model_card import CardFacts, render_model_card
from components.registry.register import (
    LiveEvidence,
    RegisterResult,
    register_candidate,
)
from components.registry.tracking import RunLogger, mlflow_client
from flows.reports import publish_gate_report, publish_model_card


@task
def register_version(
    run_id: str,
    model_name: str,
    adapter_dir: str,
    base: BaseModelRef,
    tags: dict[str, str],
    evaluation: EvalResult,
    live: LiveEvidence | None,
    promote_to: str,
) -> RegisterResult:
    return register_candidate(
        run_id,
        model_name,
        adapter_dir,
        base,
        tags,
        evaluation.comparison,
        live,
        promote_to,
        evaluation.anchor,
    )


@flow(name="register")
def register_stage(
    model_name: str,
    adapter_dir: str,
    base: BaseModelRef,
    lineage: dict[str, str],
    evaluation: EvalResult,
    run_id: str,
    live: LiveEvidence | None = None,
    promote_to: str = CHAMPION,
) -> RegisterResult:
    """Register the candidate; the gate promotes it (to `promote_to`: champion, or canary)
    only if clearly better."""
    metric_tags = {
        f"eval.{metric}": f"{s['value']:.4f}"
        for metric, s in evaluation.scores["candidate"].items()
    }
    result = register_version(
        run_id,
        model_name,
        adapter_dir,
        base,
        {**lineage, **metric_tags},
        evaluation,
        live,
        promote_to,
    )
    RunLogger(run_id).tags(
        {
            "registered_version": result.version,
            "gate.decision": "promoted" if result.gate.promote else "rejected",
            "gate.reason": result.gate.reason,
            "gate.rule": result.gate.rule,
        }
    )
    publish_gate_report(model_name, result, tracking_uri())
    return result


@task(retries=2, retry_delay_seconds=[2, 10])
def record_model_card(facts: CardFacts, run_id: str, out_dir: Path) -> str:
    """Write the version's model card, log it with the run, make it the version's
    description in the registry, and show it as a Prefect artifact; returns its path."""
    card = render_model_card(facts)
    path = out_dir / "model_card.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(card, encoding="utf-8")
    RunLogger(run_id).artifact(path, "model_card")
    mlflow_client().update_model_version(facts.model_name, facts.version, description=card)
    publish_model_card(facts.config.name, card)
    return str(path)
