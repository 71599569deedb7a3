"""The registry's aliases: which version is the champion, the last candidate, the canary.

Every move of an alias happens here, with the tags that say why on the version it concerns,
so what the registry says about serving can be read in one file.
"""

from __future__ import annotations

import time
from typing import Any

from components.registry.tracking import mlflow_client

CHAMPION = "champion"  # the version to serve
CHALLENGER = "challenger"  # the last candidate, promoted or not
CANARY = "canary"  # promoted by the offline gate, serving a share of traffic (serve.canary)
ANCHOR = "anchor"  # the first champion: the score no later champion may fall below (the gate)


def version_at(model_name: str, alias: str) -> Any | None:
    """The model version `alias` points to, or None."""
    from mlflow.exceptions import MlflowException  # mlflow loads only when the registry is read

    try:
        return mlflow_client().get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def current_champion(model_name: str) -> Any | None:
    """The model version the `champion` alias points to, or None."""
    return version_at(model_name, CHAMPION)


def point(model_name: str, alias: str, version: str) -> None:
    """Point `alias` at `version` (a new candidate, a promotion, a restored champion); the
    first champion also becomes the `anchor`."""
    mlflow_client().set_registered_model_alias(model_name, alias, version)
    if alias == CHAMPION and version_at(model_name, ANCHOR) is None:
        mlflow_client().set_registered_model_alias(model_name, ANCHOR, version)


def start_canary(model_name: str, version: str) -> None:
    """Make `version` the canary, marking when it began: the monitor compares it with the
    champion on the answers since then."""
    point(model_name, CANARY, version)
    mlflow_client().set_model_version_tag(
        model_name, version, "canary.started_at", f"{time.time():.0f}"
    )


def end_canary(model_name: str, version: str, decision: str, reason: str) -> None:
    """Record the verdict on the canary `version` ("promoted" or "rolled back") on it, like the
    gate's (`canary.decision`, `canary.reason`, `canary.ended_at`); the canary alias goes, and
    a promoted canary becomes champion."""
    client = mlflow_client()
    client.set_model_version_tag(model_name, version, "canary.decision", decision)
    client.set_model_version_tag(model_name, version, "canary.reason", reason[:5000])
    client.set_model_version_tag(model_name, version, "canary.ended_at", f"{time.time():.0f}")
    client.delete_registered_model_alias(model_name, CANARY)
    if decision == "promoted":
        point(model_name, CHAMPION, version)
