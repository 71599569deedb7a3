"""The router: is a question in the served version's domain (components/domain.py)?

It follows the version the service answers with: when the version changes it embeds that
version's training prompts in the background, judging against the previous version's domain
(or not at all, at start) until the new one is ready, so no request waits for it.
"""

from __future__ import annotations

import logging
import threading

from components.config import RoutingConfig
from components.domain import DomainModel, DomainVerdict
from components.model.embedding import sentence_embedder
from components.registry.register import training_prompts
from components.registry.tracking import mlflow_client

log = logging.getLogger("flywheel.router")


class Router:
    def __init__(self, config: RoutingConfig, model_name: str, embedding_model: str) -> None:
        self.config, self.model_name, self.embedding_model = config, model_name, embedding_model
        self._domain: DomainModel | None = None
        self._version: str | None = None  # the version whose domain is (being) fitted
        self._lock = threading.Lock()

    def follow(self, version: str) -> None:
        """Fit the domain of `version` in the background, once."""
        with self._lock:
            if not version or version == self._version:
                return
            self._version = version
        threading.Thread(target=self._fit, args=(version,), daemon=True).start()

    def _fit(self, version: str) -> None:
        try:
            run_id = mlflow_client().get_model_version(self.model_name, version).run_id
            prompts = training_prompts(run_id)
            domain = DomainModel(
                prompts, sentence_embedder(self.embedding_model), self.config.min_similarity
            )
        except Exception as exc:  # routing waits for the next version; answers go on
            log.warning("routing: cannot learn the domain of version %s: %s", version, exc)
            return
        with self._lock:
            if self._version == version:
                self._domain = domain
        log.info("routing: version %s's domain from %d training prompts", version, domain.size)

    def judge(self, question: str) -> DomainVerdict | None:
        """The verdict on `question`, or None while no domain is known yet."""
        domain = self._domain
        return domain.judge(question) if domain is not None else None
