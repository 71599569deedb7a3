"""The inference log and user feedback: a durable store the monitor reads.

Generations are queued and written by a background thread (`SpooledWriter`), so logging
never slows a request, and a write that fails does not lose the rows: they wait in a spool
file under `$FLYWHEEL_HOME/spool/` and are written later, with backoff. `close()` drains the
queue (and tries the spool once more), so a clean shutdown loses nothing. SQLite in WAL mode
under `$FLYWHEEL_HOME` by default; any SQLAlchemy URL through `FLYWHEEL_FEEDBACK_DB`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter
from dataclasses import asdict
from typing import Any

from sqlalchemy import MetaData, select
from sqlalchemy.exc import IntegrityError

from components.inference.records import (
    Answer,
    FeedbackRecord,
    InferenceRecord,
    Rating,
    StoreBusy,
    UnknownRequest,
)
from components.inference.schema import add_missing_columns, open_engine, tables
from components.inference.spool import SpooledWriter
from components.paths import feedback_db_url, spool_dir

log = logging.getLogger("flywheel.store")
FLUSH_TIMEOUT_S = 20.0  # how long feedback waits for its generation to reach the database


class InferenceStore:
    """Append-only inference log plus one feedback row per request (idempotent upsert)."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url or feedback_db_url()
        self.engine = open_engine(self.url)
        metadata = MetaData()
        self.inference, self.feedback = tables(metadata)
        metadata.create_all(self.engine)
        add_missing_columns(self.engine, self.inference)
        add_missing_columns(self.engine, self.feedback)
        digest = hashlib.sha256(self.engine.url.render_as_string().encode()).hexdigest()[:12]
        spool = spool_dir() / f"inference-{digest}-{os.getpid()}.jsonl"
        self.writer = SpooledWriter(self._insert, spool)

    def __enter__(self) -> InferenceStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def log(self, record: InferenceRecord) -> None:
        """Queue a generation for writing; returns immediately."""
        self.writer.put(asdict(record))

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        """Insert rows; a row already written (a replayed spool) is skipped, not an error."""
        with self.engine.begin() as conn:
            ids = [r["request_id"] for r in rows]
            present = set(
                conn.execute(
                    select(self.inference.c.request_id).where(self.inference.c.request_id.in_(ids))
                ).scalars()
            )
            fresh = [r for r in rows if r["request_id"] not in present]
            if fresh:
                conn.execute(self.inference.insert(), fresh)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every logged generation is in the database; False on timeout."""
        return self.writer.flush(timeout)

    def close(self) -> None:
        """Write what is queued (the spool gets one last try), then stop the writer.

        Bounded by the database's busy timeout: each write waits at most that long, and rows
        it still refuses stay in the spool, which the next store on this database writes.
        """
        if not self.writer.close():
            log.warning("inference log: %s kept for the next start", self.writer.spool)
        self.engine.dispose()

    def add_feedback(
        self,
        request_id: str,
        rating: Rating,
        correction: str | None = None,
        comment: str | None = None,
        client: str | None = None,
    ) -> tuple[FeedbackRecord, bool]:
        """Attach feedback to a logged request; returns (record, created). Repeats are no-ops,
        also when they arrive at once: the one that loses the insert reads the winner's row."""
        if not self.flush(timeout=FLUSH_TIMEOUT_S):  # the generation may still be queued
            raise StoreBusy("the inference log is still being written; retry shortly")
        record = FeedbackRecord(request_id, rating, correction, comment, time.time(), client)
        try:
            return self._upsert_feedback(record)
        except IntegrityError:  # another writer inserted this request's row first
            return self._upsert_feedback(record)

    def _upsert_feedback(self, record: FeedbackRecord) -> tuple[FeedbackRecord, bool]:
        with self.engine.begin() as conn:
            known = conn.execute(
                select(self.inference.c.request_id).where(
                    self.inference.c.request_id == record.request_id
                )
            ).first()
            if known is None:
                raise UnknownRequest(record.request_id)
            existing = (
                conn.execute(
                    select(self.feedback).where(self.feedback.c.request_id == record.request_id)
                )
                .mappings()
                .first()
            )
            if existing is None:
                conn.execute(self.feedback.insert(), asdict(record))
                return record, True
            said = (record.rating, record.correction, record.comment)
            if (existing["rating"], existing["correction"], existing["comment"]) == said:
                return FeedbackRecord(**existing), False
            conn.execute(
                self.feedback.update()
                .where(self.feedback.c.request_id == record.request_id)
                .values(
                    rating=record.rating,
                    correction=record.correction,
                    comment=record.comment,
                    created_at=record.created_at,
                    client=record.client,
                )
            )
            return record, True

    def get(self, request_id: str) -> InferenceRecord | None:
        self.flush(FLUSH_TIMEOUT_S)
        with self.engine.connect() as conn:
            row = (
                conn.execute(
                    select(self.inference).where(self.inference.c.request_id == request_id)
                )
                .mappings()
                .first()
            )
        return InferenceRecord(**row) if row else None

    def _since(self, table: Any, since: float) -> list[Any]:
        query = select(table).where(table.c.created_at >= since).order_by(table.c.created_at)
        with self.engine.connect() as conn:
            return list(conn.execute(query).mappings().all())

    def inferences_since(self, since: float) -> list[InferenceRecord]:
        self.flush(FLUSH_TIMEOUT_S)
        return [InferenceRecord(**r) for r in self._since(self.inference, since)]

    def feedback_since(self, since: float) -> list[FeedbackRecord]:
        return [FeedbackRecord(**r) for r in self._since(self.feedback, since)]

    def rating_counts(self, since: float = 0.0) -> Counter[str]:
        return Counter(f.rating for f in self.feedback_since(since))

    def answers_since(
        self, since: float, until: float | None = None, rated: bool = False
    ) -> list[Answer]:
        """Generations joined with their feedback (None where there is none).

        The window [since, until) is on the generation's time, or with `rated` on the
        feedback's time (feedback often comes later than the answer), keeping rated ones only.
        """
        self.flush(FLUSH_TIMEOUT_S)
        i, f = self.inference, self.feedback
        clock = f.c.created_at if rated else i.c.created_at
        join = i.join if rated else i.outerjoin
        query = (
            select(
                i,
                f.c.rating,
                f.c.correction,
                f.c.comment,
                f.c.created_at.label("rated_at"),
                f.c.client.label("rated_by"),
            )
            .select_from(join(f, f.c.request_id == i.c.request_id))
            .where(clock >= since)
            .order_by(clock)
        )
        if until is not None:
            query = query.where(clock < until)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [Answer(**row) for row in rows]
