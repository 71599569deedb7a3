"""How one request is answered: from the correction memory, with the scope reply, or by a
model (the one the router chooses), grounded in the docs when retrieval is on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio

from components.config import ServeConfig
from components.memory.store import CorrectionMemory, Lookup, Recall
from components.registry.aliases import CHAMPION
from components.retrieval.index import DocsIndex, Hit
from components.serving.protocol import GenerationInput, GenerationOutput
from components.serving.router import Router
from service.metrics import Metrics

MEMORY_HEADER = "x-flywheel-memory"  # hit, miss or off on every generation response
CACHE_HEADER = "x-flywheel-cache"  # hit, miss, error or off: what the response cache did
RETRIEVAL_HEADER = "x-flywheel-retrieval"  # on (the docs were searched) or off
ROUTE_HEADER = "x-flywheel-route"  # champion, scope, another model's name, or off (not judged)
MODEL_HEADER = "x-flywheel-model"  # the name of the served model that answered


@dataclass(frozen=True)
class Asked:
    """What a request's headers asked for: the correction memory and the docs (unless off)."""

    memory: bool = True
    docs: bool = True


ASK_ALL = Asked()  # a request that turned nothing off


@dataclass(frozen=True)
class Plan:
    """How one request is answered: by the model (asked `item`, grounded in `hits` when
    retrieval is on), or with a `fixed` answer: a correction from the memory (`recall`) or
    the scope reply to a question outside the champion's domain (`route` "scope")."""

    item: GenerationInput
    memory: str  # x-flywheel-memory: hit, miss or off
    recall: Recall | None = None
    memory_note: str | None = None  # why the memory answered or abstained
    route: str = "off"  # x-flywheel-route: champion, scope, another model's name, or off
    similarity: float | None = None  # to the champion's nearest training prompt
    hits: list[Hit] | None = None
    fixed: str | None = None

    def headers(self, out: GenerationOutput) -> dict[str, str]:
        """The answer's headers, given the output of the model that answered."""
        return {
            "x-model-version": out.model_version,
            MODEL_HEADER: out.model,
            MEMORY_HEADER: self.memory,
            CACHE_HEADER: out.cache,
            RETRIEVAL_HEADER: "off" if self.hits is None else "on",
            ROUTE_HEADER: self.route,
        }

    def sources(self) -> dict[str, Any]:
        """The response's `sources` field (an extra OpenAI clients ignore), when grounded."""
        return {} if self.hits is None else {"sources": [hit.source() for hit in self.hits]}


class Planner:
    """Makes each request's plan: the memory first, then the router, then the docs."""

    def __init__(
        self,
        settings: ServeConfig,
        metrics: Metrics,
        memory: CorrectionMemory | None,
        router: Router | None,
        docs: DocsIndex | None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.memory = memory
        self.router = router
        self.docs = docs  # grounded answers (retrieval:), None when the profile has none

    async def plan(self, item: GenerationInput, question: str, asked: Asked) -> Plan:
        """A correction from the memory first; then, unless the request named its model, the
        router: outside the champion's domain the scope reply or the model it sends those to;
        then the model, grounded in the docs when retrieval is on."""
        memory, lookup = await self._look_up(question, asked.memory)
        note = lookup.reason if lookup else None
        if lookup is not None and lookup.recall is not None:
            return Plan(item, memory, lookup.recall, note, fixed=lookup.recall.entry.answer)
        route, similarity = ("off", None) if item.model else await self._route(question)
        if route == "scope":
            reply = self.settings.routing.scope_reply
            return Plan(item, memory, None, note, route, similarity, fixed=reply)
        if route not in (CHAMPION, "off"):
            item = item.model_copy(update={"model": route, "routed": True})
        grounded, hits = self._ground(item, question, asked)
        return Plan(grounded, memory, None, note, route, similarity, hits)

    async def _look_up(self, question: str, use_memory: bool) -> tuple[str, Lookup | None]:
        """(x-flywheel-memory value, what the memory did): the memory is consulted unless
        the request opted out (`x-flywheel-memory: off`) or the profile turned it off."""
        if self.memory is None or not use_memory:
            self.metrics.memory_lookups.labels("off").inc()
            return "off", None
        lookup = await anyio.to_thread.run_sync(self.memory.look_up, question)
        self.metrics.memory_entries.set(len(self.memory.served()))
        status = "hit" if lookup.recall else "miss"
        self.metrics.memory_lookups.labels(status).inc()
        return status, lookup

    async def _route(self, question: str) -> tuple[str, float | None]:
        """(x-flywheel-route, the similarity): for a question outside the champion's domain
        `scope` (the scope reply) or the name of the model the profile sends those to, else
        `champion`; `off` when routing is off or the domain is not known yet."""
        if self.router is None:
            return "off", None
        verdict = await anyio.to_thread.run_sync(self.router.judge, question)
        if verdict is None:
            route, similarity = "off", None
        else:
            away = self.settings.routing.out_of_domain
            route = CHAMPION if verdict.in_domain else "scope" if away == "scope_reply" else away
            similarity = verdict.similarity
        self.metrics.routes.labels(route).inc()
        return route, similarity

    def _ground(
        self, item: GenerationInput, question: str, asked: Asked
    ) -> tuple[GenerationInput, list[Hit] | None]:
        """The request with the docs' passages for its question in its last user turn, and
        those passages; unchanged (and None) without an index, for raw text, or when the
        request opted out (`x-flywheel-retrieval: off`)."""
        if self.docs is None or not asked.docs or item.messages is None:
            return item, None
        grounded, hits = self.docs.ground(question)
        self.metrics.retrieval_passages.observe(len(hits))
        messages = [dict(m) for m in item.messages]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last_user]["content"] = grounded
        return item.model_copy(update={"messages": messages}), hits
