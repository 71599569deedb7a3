"""Register stage: an MLflow model version with lineage, `challenger`, and the gate."""

from __future__ import annotations

from prefect import flow, task

from components.evaluate.evaluation import EvalResult
from components.model.base_model import BaseModelRef
from components.paths import tracking_uri
from components.registry.register import LiveEvidence, RegisterResult, register_candidate
from components.registry.tracking import RunLogger
from flows.reports import publish_gate_report


@task
def register_version(
    run_id: str,
    model_name: str,
    adapter_dir: str,
    base: BaseModelRef,
    tags: dict[str, str],
    evaluation: EvalResult,
    live: LiveEvidence | None,
) -> RegisterResult:
    return register_candidate(
        run_id, model_name, adapter_dir, base, tags, evaluation.comparison, live
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
) -> RegisterResult:
    """Register the candidate; the gate promotes it to champion only if clearly better."""
    metric_tags = {
        f"eval.{metric}": f"{s['value']:.4f}"
        for metric, s in evaluation.scores["candidate"].items()
    }
    result = register_version(
        run_id, model_name, adapter_dir, base, {**lineage, **metric_tags}, evaluation, live
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
