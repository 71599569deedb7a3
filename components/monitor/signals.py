"""What the monitor reads besides the service's metrics: the champion's domain (its training
prompts, and the router's view of it) and the corrections waiting in the memory."""

from __future__ import annotations

import logging

from components.config import PipelineConfig
from components.domain import DomainModel
from components.memory.store import CorrectionMemory
from components.model.embedding import sentence_embedder
from components.registry.aliases import current_champion
from components.registry.register import training_prompts

log = logging.getLogger(__name__)


def reference_prompts(config: PipelineConfig) -> tuple[list[str], str | None]:
    """The champion's training prompts (logged with its run), and the champion's version."""
    from mlflow.exceptions import MlflowException  # mlflow loads only when the registry is read

    champion = current_champion(config.registry.model_name)
    if champion is None:
        return [], None
    try:
        return training_prompts(champion.run_id), str(champion.version)
    except MlflowException as exc:  # a version registered from a run that logged no data
        log.warning("no training prompts for the champion's domain: %s", exc)
        return [], str(champion.version)


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
