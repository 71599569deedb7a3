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

Every entry also records what it is about (the words of its question that its correction
restates); which of them tell it apart from its family is worked out over the served entries,
and an entry answers only a question that names them (`components/memory/scope.py`).

Retired entries (the champion's weights now state the fact) and deleted ones are kept for
the record and never served.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from components.config import MemoryConfig
from components.inference.schema import add_missing_columns, open_engine
from components.memory.scope import (
    Family,
    PhraseVectors,
    Verdict,
    about,
    decide,
    families,
    restates,
)
from components.memory.trust import Decision, Offer, TrustPolicy
from components.model.embedding import sentence_embedder
from components.text import normalize_text

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
    about: tuple[str, ...] = ()  # the words of its question that its correction restates

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


@dataclass(frozen=True)
class Recall:
    entry: MemoryEntry
    score: float


@dataclass(frozen=True)
class Lookup:
    """What the memory did with one question: the entry that answers, or why none does."""

    recall: Recall | None
    reason: str


@dataclass(frozen=True)
class _Index:
    """The served entries with their question and correction vectors and their families,
    swapped as one so readers always see a consistent set."""

    served: list[MemoryEntry]
    questions: Any = None
    fits: Any = None  # the correction's vector, or the question's where it restates nothing
    kin: tuple[Family, ...] = ()


class CorrectionRejected(ValueError):
    """A correction the trust policy does not take (too long, rate-limited, empty...)."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.reason)
        self.rule = decision.rule


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
        # JSON; empty in rows an older release wrote, filled in when they are first loaded
        Column("answer_embedding", Text),
        Column("about", Text),
    )


class CorrectionMemory:
    """Remember, recall, list and delete corrections under one `MemoryConfig` policy."""

    def __init__(self, config: MemoryConfig, url: str | None = None, embedder: Any = None) -> None:
        from sqlalchemy import MetaData

        self.config = config
        self.policy = TrustPolicy(config)
        self.engine = open_engine(url)
        metadata = MetaData()
        self.table = _table(metadata)
        metadata.create_all(self.engine)
        add_missing_columns(self.engine, self.table)
        self._embedder = embedder
        self._phrases: PhraseVectors | None = None
        self._lock = threading.Lock()
        self._checked_at = 0.0
        self._stamp: tuple[Any, ...] | None = None
        self._index = _Index([])

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            self._embedder = sentence_embedder(self.config.embedding_model)
        return self._embedder

    @property
    def phrases(self) -> PhraseVectors:
        if self._phrases is None:
            self._phrases = PhraseVectors(self.embedder)
        return self._phrases

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
        """Store one correction (scrubbed) the trust policy checks; `CorrectionRejected` if it
        says no. Whether it is served also waits for agreement (`_load`)."""
        now = time.time() if now is None else now
        offer = Offer.of(question, answer, source, client, now)
        question, answer = offer.question, offer.answer
        if question and answer and (known := self._entry_for(request_id, source, offer.key)):
            return known  # the same correction of the same request, offered again
        sent = self._sent_last_hour(client, now) if source == "feedback" else 0
        if not (decision := self.policy.check(offer, sent)).admitted:
            raise CorrectionRejected(decision)
        vectors = self.embedder.embed([question, answer])
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
            about=tuple(about(question, answer, self.phrases)),
        )
        with self.engine.begin() as conn:
            conn.execute(
                self.table.insert(),
                {
                    **entry.to_dict(),
                    "key": offer.key,
                    "updated_at": now,
                    "embedding": _vector_json(vectors[0]),
                    "answer_embedding": _vector_json(vectors[1]),
                    "about": json.dumps(entry.about),
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
        query = select(*[t.c[f] for f in _FIELDS]).where(
            t.c.request_id == request_id, t.c.source == source, t.c.key == key
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return _entry(row) if row else None

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

        query = select(*[self.table.c[f] for f in _FIELDS])
        if status is not None:
            query = query.where(self.table.c.status == status)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(self.table.c.accepted_at)).mappings().all()
        return [_entry(row) for row in rows]

    def served(self) -> list[MemoryEntry]:
        """The entries the policy serves now (one per question and correction)."""
        self._refresh()
        return list(self._index.served)

    def families(self) -> dict[str, dict[str, Any]]:
        """For each served entry: the words that tell it apart and its siblings' ids."""
        self._refresh()
        index = self._index
        return {
            entry.id: {
                "distinguishing": family.distinguishing,
                "siblings": [index.served[j].id for j in family.siblings],
            }
            for entry, family in zip(index.served, index.kin, strict=True)
        }

    def siblings_of(self, correction: str, limit: int = 5) -> str:
        """The served corrections of the same family as `correction` (at least `family`
        similar), each with the words that tell it apart: what a reviewer checks a new
        correction against. Empty when it has no family."""
        self._refresh()
        index = self._index
        if not index.served:
            return ""
        fits = index.fits @ self.embedder.embed([normalize_text(correction)])[0]
        near = [int(i) for i in fits.argsort()[::-1][:limit] if fits[i] >= self.config.family]
        same = normalize_text(correction).lower()
        lines = [
            f"{index.served[i].answer} (told apart by: "
            f"{', '.join(index.kin[i].distinguishing) or 'nothing yet'})"
            for i in near
            if index.served[i].answer.lower() != same
        ]
        return "; ".join(lines)

    def recall(self, question: str) -> Recall | None:
        """The served entry that answers `question`, if one does (see `look_up`)."""
        return self.look_up(question).recall

    def look_up(self, question: str) -> Lookup:
        """The served entry that asks the same thing as `question`, or why none answers."""
        self._refresh()
        index = self._index
        if not index.served:
            return Lookup(None, "the memory serves no corrections")
        vector = self.embedder.embed([normalize_text(question)])[0]
        verdict: Verdict = decide(
            question,
            vector,
            index.questions,
            index.fits,
            index.kin,
            self.phrases,
            self.config,
        )
        if verdict.best is None:
            return Lookup(None, verdict.reason)
        return Lookup(Recall(index.served[verdict.best], verdict.score), verdict.reason)

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
                active = [dict(r) for r in rows]
            self._load([self._complete(row) for row in active])
            self._stamp = stamp

    def _complete(self, row: dict[str, Any]) -> dict[str, Any]:
        """An entry written by an older release, given what it is about and its correction's
        vector (stored, so this happens once)."""
        if row["about"] is not None and row["answer_embedding"] is not None:
            return row
        row["about"] = json.dumps(about(row["question"], row["answer"], self.phrases))
        row["answer_embedding"] = _vector_json(self.embedder.embed([row["answer"]])[0])
        with self.engine.begin() as conn:
            conn.execute(
                self.table.update()
                .where(self.table.c.id == row["id"])
                .values(about=row["about"], answer_embedding=row["answer_embedding"])
            )
        return row

    def _load(self, rows: list[dict[str, Any]]) -> None:
        import numpy as np

        clients: dict[str, set[str]] = {}
        for row in rows:
            clients.setdefault(row["key"], set()).add(row["client"])
        served, questions, answers, seen = [], [], [], set()
        for row in rows:
            if row["key"] in seen:
                continue
            if self.policy.agreed(row["source"], len(clients[row["key"]])).admitted:
                seen.add(row["key"])
                served.append(_entry(row))
                questions.append(json.loads(row["embedding"]))
                answers.append(json.loads(row["answer_embedding"]))
        if not served:
            self._index = _Index([])
            return
        question_vectors = np.asarray(questions, dtype=np.float32)
        # What a question is fitted to: the correction where it restates what it is about,
        # the corrected question where it does not (a bare value: "45 days.").
        fit_vectors = np.asarray(
            [
                a if restates(e.about, e.answer) else q
                for e, q, a in zip(served, questions, answers, strict=True)
            ],
            dtype=np.float32,
        )
        kin = families(
            [e.about for e in served],
            [f"{e.question}\n{e.answer}" for e in served],
            fit_vectors,
            self.config,
        )
        self._index = _Index(served, question_vectors, fit_vectors, tuple(kin))


def _vector_json(vector: Any) -> str:
    return json.dumps([round(float(v), 6) for v in vector])


_FIELDS = list(MemoryEntry.__dataclass_fields__)


def _entry(row: Any) -> MemoryEntry:
    """An entry from its row (`about` is stored as JSON, absent in older rows)."""
    fields = {f: row[f] for f in _FIELDS}
    fields["about"] = tuple(json.loads(row["about"])) if row["about"] else ()
    return MemoryEntry(**fields)


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
