"""The correction memory: accepted corrections, keyed by an embedding of the question.

Entries live in the feedback database (table `memory_entries`), beside the inference log, so
they survive restarts and every process that shares the database sees the same memory. Every
entry records its source (`label-studio` or `feedback`), the request it corrected, the model
version that answered, the client that sent it and when it was accepted. Which entries are
served is the profile's `memory:` policy:

- `trust: reviewed` (default): only corrections approved or made in Label Studio.
- `trust: feedback`: also corrections sent to `POST /feedback`, once `min_agreement`
  different clients sent the same correction for the same question; each client may send
  `corrections_per_client_per_hour`, each at most `max_correction_chars`; PII is scrubbed.

Retired entries (the champion's weights now state the fact) and deleted ones are kept for
the record and never served.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

from components.config import MemoryConfig
from components.inference.schema import open_engine
from components.model.embedding import sentence_embedder
from components.text import normalize_text, scrub_pii

Source = Literal["label-studio", "feedback"]
RELOAD_EVERY_S = 1.0  # how stale a served memory may be after another process changed it


@dataclass(frozen=True)
class MemoryEntry:
    id: str
    question: str
    answer: str
    source: str
    request_id: str
    model_version: str
    client: str
    accepted_at: float
    status: str  # active, retired or deleted

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


@dataclass(frozen=True)
class Recall:
    entry: MemoryEntry
    score: float


class CorrectionRejected(ValueError):
    """A correction the memory policy does not take (too long, rate-limited, empty)."""


def _key(question: str, answer: str) -> str:
    """Same question and same correction, whatever the spacing and case."""
    text = f"{' '.join(question.lower().split())}\n{' '.join(answer.lower().split())}"
    return hashlib.sha256(text.encode()).hexdigest()


def _table(metadata: Any) -> Any:
    from sqlalchemy import Column, Float, String, Table, Text

    return Table(
        "memory_entries",
        metadata,
        Column("id", String(40), primary_key=True),
        Column("question", Text, nullable=False),
        Column("answer", Text, nullable=False),
        Column("key", String(64), nullable=False, index=True),
        Column("source", String(16), nullable=False),
        Column("request_id", String(64), nullable=False),
        Column("model_version", String(128), nullable=False),
        Column("client", String(64), nullable=False, index=True),
        Column("accepted_at", Float, nullable=False, index=True),
        Column("updated_at", Float, nullable=False),
        Column("status", String(16), nullable=False),
        Column("embedding", Text, nullable=False),
    )


class CorrectionMemory:
    """Remember, recall, list and delete corrections under one `MemoryConfig` policy."""

    def __init__(self, config: MemoryConfig, url: str | None = None, embedder: Any = None) -> None:
        from sqlalchemy import MetaData

        self.config = config
        self.engine = open_engine(url)
        metadata = MetaData()
        self.table = _table(metadata)
        metadata.create_all(self.engine)
        self._embedder = embedder
        self._lock = threading.Lock()
        self._checked_at = 0.0
        self._stamp: tuple[Any, ...] | None = None
        # (served entries, their question vectors), swapped as one so readers see a pair
        self._index: tuple[list[MemoryEntry], Any] = ([], None)

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            self._embedder = sentence_embedder(self.config.embedding_model)
        return self._embedder

    def close(self) -> None:
        self.engine.dispose()

    # -- writing -------------------------------------------------------------------------

    def remember(
        self,
        question: str,
        answer: str,
        source: Source,
        request_id: str,
        model_version: str,
        client: str = "",
        now: float | None = None,
    ) -> MemoryEntry:
        """Store one accepted correction (scrubbed); `CorrectionRejected` if the policy says no."""
        now = time.time() if now is None else now
        pii: Counter[str] = Counter()
        question = scrub_pii(normalize_text(question), pii)
        answer = scrub_pii(normalize_text(answer), pii)
        if not question or not answer:
            raise CorrectionRejected("the question and the correction must not be empty")
        if (known := self._entry_for(request_id, source, _key(question, answer))) is not None:
            return known  # the same correction of the same request, offered again
        if len(answer) > self.config.max_correction_chars:
            raise CorrectionRejected(
                f"the correction is {len(answer)} characters; the memory takes at most "
                f"{self.config.max_correction_chars}"
            )
        if source == "feedback" and self._sent_last_hour(client, now) >= (
            self.config.corrections_per_client_per_hour
        ):
            raise CorrectionRejected(
                f"this client sent {self.config.corrections_per_client_per_hour} corrections in "
                "the last hour; the memory takes no more from it for now"
            )
        vector = self.embedder.embed([question])[0]
        entry = MemoryEntry(
            id=f"mem-{uuid.uuid4().hex[:16]}",
            question=question,
            answer=answer,
            source=source,
            request_id=request_id,
            model_version=model_version,
            client=client,
            accepted_at=now,
            status="active",
        )
        with self.engine.begin() as conn:
            conn.execute(
                self.table.insert(),
                {
                    **entry.to_dict(),
                    "key": _key(question, answer),
                    "updated_at": now,
                    "embedding": json.dumps([round(float(v), 6) for v in vector]),
                },
            )
        self._checked_at = 0.0  # this process sees its own change at once
        return entry

    def set_status(self, entry_id: str, status: Literal["active", "retired", "deleted"]) -> bool:
        """Change an entry's status; False if there is no such entry."""
        with self.engine.begin() as conn:
            changed = conn.execute(
                self.table.update()
                .where(self.table.c.id == entry_id)
                .values(status=status, updated_at=time.time())
            ).rowcount
        self._checked_at = 0.0
        return bool(changed)

    def _entry_for(self, request_id: str, source: str, key: str) -> MemoryEntry | None:
        from sqlalchemy import select

        t = self.table
        query = select(*[t.c[f] for f in MemoryEntry.__dataclass_fields__]).where(
            t.c.request_id == request_id, t.c.source == source, t.c.key == key
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return MemoryEntry(**row) if row else None

    def _sent_last_hour(self, client: str, now: float) -> int:
        from sqlalchemy import func, select

        t = self.table
        query = select(func.count()).where(
            t.c.client == client, t.c.source == "feedback", t.c.accepted_at >= now - 3600
        )
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    # -- reading -------------------------------------------------------------------------

    def entries(self, status: str | None = None) -> list[MemoryEntry]:
        """Every entry (or those with `status`), oldest first."""
        from sqlalchemy import select

        query = select(*[self.table.c[f] for f in MemoryEntry.__dataclass_fields__])
        if status is not None:
            query = query.where(self.table.c.status == status)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(self.table.c.accepted_at)).mappings().all()
        return [MemoryEntry(**row) for row in rows]

    def served(self) -> list[MemoryEntry]:
        """The entries the policy serves now (one per question and correction)."""
        self._refresh()
        return list(self._index[0])

    def recall(self, question: str) -> Recall | None:
        """The served entry whose question is most similar, if at least `threshold`."""
        self._refresh()
        served, vectors = self._index
        if not served:
            return None
        vector = self.embedder.embed([normalize_text(question)])[0]
        scores = vectors @ vector
        best = int(scores.argmax())
        score = float(scores[best])
        if score < self.config.threshold:
            return None
        return Recall(served[best], score)

    def _refresh(self) -> None:
        """Reload the served entries when the table changed (checked at most every second)."""
        from sqlalchemy import func, select

        with self._lock:
            now = time.monotonic()
            if now - self._checked_at < RELOAD_EVERY_S:
                return
            self._checked_at = now
            t = self.table
            with self.engine.connect() as conn:
                stamp = tuple(conn.execute(select(func.count(), func.max(t.c.updated_at))).one())
                if stamp == self._stamp:
                    return
                rows = conn.execute(
                    select(t).where(t.c.status == "active").order_by(t.c.accepted_at)
                ).mappings()
                self._load([dict(r) for r in rows])
            self._stamp = stamp

    def _load(self, rows: list[dict[str, Any]]) -> None:
        import numpy as np

        clients: dict[str, set[str]] = {}
        for row in rows:
            clients.setdefault(row["key"], set()).add(row["client"])
        served, vectors, seen = [], [], set()
        for row in rows:
            if row["key"] in seen:
                continue
            reviewed = row["source"] == "label-studio"
            agreed = len(clients[row["key"]]) >= self.config.min_agreement
            if reviewed or (self.config.trust == "feedback" and agreed):
                seen.add(row["key"])
                served.append(MemoryEntry(**{f: row[f] for f in MemoryEntry.__dataclass_fields__}))
                vectors.append(json.loads(row["embedding"]))
        self._index = (served, np.asarray(vectors, dtype=np.float32) if vectors else None)


def remember_reviews(config: MemoryConfig, items: list[Any]) -> int:
    """Reviewed corrections (curated items from Label Studio) into the memory; returns how
    many entries are new. Items seen before are recognised and skipped."""
    if not config.enabled:
        return 0
    memory = CorrectionMemory(config)
    try:
        before = len(memory.entries())
        for item in items:
            if item.source != "label-studio":
                continue
            try:
                memory.remember(
                    item.prompt, item.answer, "label-studio", item.request_id, item.model_version
                )
            except CorrectionRejected:
                continue  # too long or empty: the curated data still has it
        return len(memory.entries()) - before
    finally:
        memory.close()
