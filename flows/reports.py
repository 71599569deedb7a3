"""Markdown and tables for Prefect artifacts, so each run explains itself in the UI."""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact


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
