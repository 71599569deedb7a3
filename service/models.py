"""The models the service serves: the champion's version (named in every response), the
listing of /v1/models, and the admin actions that swap or unload a model."""

from __future__ import annotations

import logging
from typing import Any

from components.config import PipelineConfig
from components.registry.aliases import CHAMPION
from components.serving.loading import ModelNotFound, default_model_uri, resolve_model_uri
from components.serving.protocol import GenerationOutput
from components.serving.router import Router
from service.api import ApiError, ReloadRequest, model_card, wire
from service.edge import CurrentVersion
from service.generator_client import GeneratorClient
from service.metrics import Metrics

log = logging.getLogger("flywheel.service")


class ServedModels:
    """What the generator serves, as the public API and the admin see it."""

    def __init__(
        self,
        generator: GeneratorClient,
        model_name: str,
        metrics: Metrics,
        router: Router | None,
    ) -> None:
        self.generator = generator
        self.model_name = model_name  # the registered model's name
        self.metrics = metrics
        self.router = router  # learns the domain of each champion version

    def announce_version(self, config: PipelineConfig) -> None:
        """Read the version about to be served (by the profile `config`) from the registry, so
        that every response, health and metrics included, names it from the start (the
        generator logs why not)."""
        try:
            _, version = resolve_model_uri(default_model_uri(config), config)
        except ModelNotFound:
            return  # the generator says so, in one line
        except Exception as exc:
            log.warning("serving version not known yet: %s", exc)
            return
        self.set_version(version)

    def set_version(self, version: str) -> None:
        """The champion serves `version` (the router learns its domain)."""
        if version and version != CurrentVersion.value:
            if CurrentVersion.value:
                self.metrics.model_version.labels(self.model_name, CurrentVersion.value).set(0)
            CurrentVersion.value = version
            self.metrics.model_version.labels(self.model_name, version).set(1)
        if version and self.router is not None:
            self.router.follow(version)

    def answered_by(self, out: GenerationOutput) -> None:
        """Note the version of the model that answered (the champion's is announced)."""
        if out.model == CHAMPION:
            self.set_version(out.model_version)

    async def listing(self) -> dict[str, Any]:
        """The registered model's name (the router and the canary choose), then each served
        model by its name; a request's `model` may be any of them."""
        cards = [model_card(self.model_name, CurrentVersion.value)]
        for row in await self.generator.models():
            shown = ("ready", "engine", "memory_gb", "error", "refused")
            extra = {k: row[k] for k in shown if k in row}
            cards.append(model_card(row["name"], row.get("version", ""), **extra))
        return {"object": "list", "data": [wire(card) for card in cards]}

    async def model(self, model_id: str) -> dict[str, Any]:
        for card in (await self.listing())["data"]:
            if card["id"] == model_id:
                return dict(card)
        raise ApiError(
            404,
            f"model '{model_id}' is not served here; GET /v1/models lists them",
            param="model",
            code="model_not_found",
        )

    async def reload(self, req: ReloadRequest) -> dict[str, Any]:
        try:
            info = await self.generator.reload(req.model_uri, req.model)
        except Exception as exc:
            raise ApiError(
                422,
                f"cannot load {req.model_uri} as {req.model}: {exc}",
                param="model_uri",
                code="model_load_failed",
            ) from None
        if req.model == CHAMPION:
            self.set_version(str(info["version"]))
        return info

    async def unload(self, model: str) -> dict[str, Any]:
        if model == CHAMPION:
            raise ApiError(
                400, "the champion is swapped (POST /admin/reload), not unloaded", param="model"
            )
        if model not in {row["name"] for row in await self.generator.models()}:
            raise ApiError(404, f"no model '{model}' is served", param="model", code="not_found")
        return await self.generator.unload(model)
