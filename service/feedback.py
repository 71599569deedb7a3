"""What users send back: ratings and corrections (offered to the correction memory), and the
admin's view of the memory."""

from __future__ import annotations

from typing import Any

import anyio

from components.inference.records import InferenceRecord, StoreBusy, UnknownRequest
from components.inference.store import InferenceStore
from components.memory.store import CorrectionMemory, CorrectionRejected
from components.memory.trust import REVIEWED, tally
from service.api import ApiError, FeedbackRequest, FeedbackResponse
from service.metrics import Metrics


class FeedbackDesk:
    """Stores feedback in the inference store and offers corrections to the memory."""

    def __init__(
        self, store: InferenceStore, memory: CorrectionMemory | None, metrics: Metrics
    ) -> None:
        self.store = store
        self.memory = memory
        self.metrics = metrics

    async def submit(self, req: FeedbackRequest, client: str = "") -> FeedbackResponse:
        def store_it() -> tuple[Any, bool, InferenceRecord | None]:
            record, created = self.store.add_feedback(
                req.request_id, req.rating, req.correction, req.comment, client
            )
            return record, created, self.store.get(req.request_id) if created else None

        try:  # off the event loop: the store may wait for its writer
            record, created, served = await anyio.to_thread.run_sync(store_it)
        except UnknownRequest:
            raise ApiError(
                404, f"unknown request_id '{req.request_id}'", param="request_id", code="not_found"
            ) from None
        except StoreBusy as exc:
            raise ApiError(503, str(exc), code="store_busy") from None
        memory = None
        if created and served is not None:
            self.metrics.feedback.labels(req.rating, served.model_version).inc()
            if req.correction:
                memory = await anyio.to_thread.run_sync(
                    self._remember, served, req.correction, client
                )
        return FeedbackResponse(
            request_id=record.request_id, rating=record.rating, stored=created, memory=memory
        )

    def _remember(self, served: InferenceRecord, correction: str, client: str) -> str:
        """Offer a user's correction to the memory; says what became of it."""
        if self.memory is None:
            return "off: the memory is disabled"
        if not served.prompt:
            return "not kept: the question was not logged (serve.log_prompts is off)"
        try:
            entry = self.memory.remember(
                served.prompt,
                correction,
                "feedback",
                served.request_id,
                served.model_version,
                client,
            )
        except CorrectionRejected as exc:
            return f"not kept: {exc}"
        return f"kept as {entry.id}"

    def memory_entries(self) -> dict[str, Any]:
        if self.memory is None:
            return {"enabled": False, "served": [], "entries": []}
        families = self.memory.families()  # served entries: what tells each apart, siblings
        stored = self.memory.entries()
        entries = [
            {**e.to_dict(), "served": e.id in families, **families.get(e.id, {})} for e in stored
        ]
        # How the policy judged every correction sent, and the reviewed ones it holds
        judged = self.memory.policy.judge_feedback(self.store.answers_since(0.0, rated=True))
        decisions = [d for _, d in judged] + [REVIEWED for e in stored if e.source != "feedback"]
        return {
            "enabled": True,
            "trust": self.memory.config.trust,
            "policy": tally(decisions),
            "entries": entries,
        }

    def forget(self, entry_id: str) -> dict[str, Any]:
        if self.memory is None or not self.memory.set_status(entry_id, "deleted"):
            raise ApiError(404, f"no memory entry '{entry_id}'", param="entry_id", code="not_found")
        return {"id": entry_id, "status": "deleted"}
