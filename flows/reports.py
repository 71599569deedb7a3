"""Markdown and tables for Prefect artifacts, so each run explains itself in the UI."""

from __future__ import annotations

import time
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event

from components.config import PipelineConfig
from components.monitor.decision import RetrainDecision
from components.registry.tracking import RunLogger


def slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-")


def publish_data_report(profile: str, ingest: Any, clean: Any, split: Any) -> None:
    lines = [
        f"## Data for `{profile}`",
        f"- ingested **{ingest.valid}** valid records, quarantined **{ingest.quarantined}** "
        f"(`{ingest.quarantine_path}`)",
        f"- from curated feedback: **{ingest.from_feedback}**",
        f"- kept after cleaning: **{clean.kept}** (dropped ones with their filter: "
        f"`{clean.dropped_path}`)",
        f"- split: train **{split.train}**, validation **{split.validation}**, "
        f"frozen test **{split.test}**",
        f"- training data hash: `{split.train_hash[:16]}`",
        "",
        "| filter | removed |",
        "|---|---:|",
        *[f"| {name} | {count} |" for name, count in clean.removed.items()],
        "",
        "| PII kind | replaced |",
        "|---|---:|",
        *[f"| {kind} | {count} |" for kind, count in clean.pii.items()],
    ]
    if ingest.reasons:
        lines += [
            "",
            "| quarantine reason | records |",
            "|---|---:|",
            *[f"| {r} | {n} |" for r, n in ingest.reasons.items()],
        ]
    create_markdown_artifact(
        "\n".join(lines), key=f"data-{slug(profile)}", description="Ingest and cleaning report"
    )


def publish_eval_report(profile: str, result: Any) -> None:
    rows = [
        {
            "model": model,
            "metric": metric,
            "value": round(s["value"], 4),
            "ci_low": round(s["low"], 4),
            "ci_high": round(s["high"], 4),
        }
        for model, metrics in result.scores.items()
        for metric, s in metrics.items()
    ]
    create_table_artifact(
        rows, key=f"eval-{slug(profile)}", description=f"Frozen test split, n={result.n_examples}"
    )


def publish_gate_report(profile: str, registered: Any, mlflow_uri: str) -> None:
    promoted_to = registered.aliases[-1]  # champion, or canary
    verdict = f"promoted to **{promoted_to}**" if registered.gate.promote else "not promoted"
    text = "\n".join(
        [
            f"## {registered.model_name} version {registered.version}: {verdict}",
            f"- {registered.gate.reason}",
            f"- aliases: {', '.join(registered.aliases)}; previous champion: "
            f"{registered.previous_champion or 'none'}",
            f"- model URI: `{registered.model_uri}` (tracking: `{mlflow_uri}`)",
        ]
    )
    create_markdown_artifact(text, key=f"gate-{slug(profile)}", description="Promotion gate")


def publish_model_card(profile: str, card: str) -> None:
    create_markdown_artifact(card, key=f"model-card-{slug(profile)}", description="Model card")


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
