"""The inference log and user feedback: a durable store the monitor reads.

Generations are queued and written by a background thread, so logging never slows a request;
`close()` drains the queue, so nothing is lost on a clean shutdown. SQLite in WAL mode under
`$FLYWHEEL_HOME` by default; any SQLAlchemy URL through `FLYWHEEL_FEEDBACK_DB`.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Literal

from components.paths import flywheel_home

Rating = Literal["up", "down"]


def feedback_db_url() -> str:
    """`FLYWHEEL_FEEDBACK_DB`, else a SQLite file under the home folder."""
    return os.environ.get("FLYWHEEL_FEEDBACK_DB") or f"sqlite:///{flywheel_home() / 'feedback.db'}"


@dataclass(frozen=True)
class InferenceRecord:
    request_id: str
    created_at: float
    model_version: str
    endpoint: str
    prompt: str
    response: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    confidence: float | None = None


@dataclass(frozen=True)
class FeedbackRecord:
    request_id: str
    rating: Rating
    correction: str | None
    comment: str | None
    created_at: float


@dataclass(frozen=True)
class Answer(InferenceRecord):
    """A logged generation joined with its feedback (None where there is none)."""

    rating: Rating | None = None
    correction: str | None = None
    comment: str | None = None
    rated_at: float | None = None


class UnknownRequest(KeyError):
    """Feedback for a request id that was never logged."""


def _tables(metadata: Any) -> tuple[Any, Any]:
    from sqlalchemy import Column, Float, ForeignKey, Integer, String, Table, Text

    inference = Table(
        "inference",
        metadata,
        Column("request_id", String(64), primary_key=True),
        Column("created_at", Float, nullable=False, index=True),
        Column("model_version", String(128), nullable=False, index=True),
        Column("endpoint", String(64), nullable=False),
        Column("prompt", Text, nullable=False),
        Column("response", Text, nullable=False),
        Column("prompt_tokens", Integer, nullable=False),
        Column("completion_tokens", Integer, nullable=False),
        Column("latency_ms", Float, nullable=False),
        Column("confidence", Float),
    )
    feedback = Table(
        "feedback",
        metadata,
        Column("request_id", String(64), ForeignKey("inference.request_id"), primary_key=True),
        Column("rating", String(8), nullable=False),
        Column("correction", Text),
        Column("comment", Text),
        Column("created_at", Float, nullable=False, index=True),
    )
    return inference, feedback


class InferenceStore:
    """Append-only inference log plus one feedback row per request (idempotent upsert)."""

    def __init__(self, url: str | None = None) -> None:
        from sqlalchemy import MetaData, create_engine, event

        self.url = url or feedback_db_url()
        if self.url.startswith("sqlite:///"):
            os.makedirs(os.path.dirname(self.url.removeprefix("sqlite:///")) or ".", exist_ok=True)
        self.engine = create_engine(self.url, future=True)
        if self.engine.dialect.name == "sqlite":

            @event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_connection: Any, _: Any) -> None:
                cursor = dbapi_connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
                cursor.execute("PRAGMA busy_timeout=5000")
                cursor.close()

        metadata = MetaData()
        self.inference, self.feedback = _tables(metadata)
        metadata.create_all(self.engine)
        self._add_missing_columns()
        self._queue: queue.Queue[InferenceRecord | None] = queue.Queue()
        self._writer = threading.Thread(target=self._drain, name="inference-log", daemon=True)
        self._writer.start()

    def _add_missing_columns(self) -> None:
        """Bring a store written by an older Flywheel up to date (new columns are nullable)."""
        from sqlalchemy import inspect, text

        present = {c["name"] for c in inspect(self.engine).get_columns("inference")}
        with self.engine.begin() as conn:
            for column in self.inference.columns:
                if column.name not in present:
                    kind = column.type.compile(self.engine.dialect)
                    conn.execute(text(f"ALTER TABLE inference ADD COLUMN {column.name} {kind}"))

    def __enter__(self) -> InferenceStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def log(self, record: InferenceRecord) -> None:
        """Queue a generation for writing; returns immediately."""
        self._queue.put(record)

    def _drain(self) -> None:
        while True:
            first = self._queue.get()
            batch = [first]
            while not self._queue.empty() and len(batch) < 256:
                batch.append(self._queue.get_nowait())
            rows = [asdict(r) for r in batch if r is not None]
            if rows:
                with self.engine.begin() as conn:
                    conn.execute(self.inference.insert(), rows)
            for _ in batch:
                self._queue.task_done()
            if None in batch:
                return

    def flush(self) -> None:
        """Wait until every queued generation is written."""
        self._queue.join()

    def close(self) -> None:
        """Write what is queued, then stop the writer."""
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join()
        self.engine.dispose()

    def add_feedback(
        self,
        request_id: str,
        rating: Rating,
        correction: str | None = None,
        comment: str | None = None,
    ) -> tuple[FeedbackRecord, bool]:
        """Attach feedback to a logged request; returns (record, created). Repeats are no-ops."""
        from sqlalchemy import select

        self.flush()  # the generation may still be in the write queue
        with self.engine.begin() as conn:
            known = conn.execute(
                select(self.inference.c.request_id).where(self.inference.c.request_id == request_id)
            ).first()
            if known is None:
                raise UnknownRequest(request_id)
            existing = (
                conn.execute(select(self.feedback).where(self.feedback.c.request_id == request_id))
                .mappings()
                .first()
            )
            record = FeedbackRecord(request_id, rating, correction, comment, time.time())
            if existing is None:
                conn.execute(self.feedback.insert(), asdict(record))
                return record, True
            if (existing["rating"], existing["correction"], existing["comment"]) == (
                rating,
                correction,
                comment,
            ):
                return FeedbackRecord(**existing), False
            conn.execute(
                self.feedback.update()
                .where(self.feedback.c.request_id == request_id)
                .values(
                    rating=rating,
                    correction=correction,
                    comment=comment,
                    created_at=record.created_at,
                )
            )
            return record, True

    def get(self, request_id: str) -> InferenceRecord | None:
        from sqlalchemy import select

        self.flush()
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
        from sqlalchemy import select

        query = select(table).where(table.c.created_at >= since).order_by(table.c.created_at)
        with self.engine.connect() as conn:
            return list(conn.execute(query).mappings().all())

    def inferences_since(self, since: float) -> list[InferenceRecord]:
        self.flush()
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
        from sqlalchemy import select

        self.flush()
        i, f = self.inference, self.feedback
        clock = f.c.created_at if rated else i.c.created_at
        join = i.join if rated else i.outerjoin
        query = (
            select(i, f.c.rating, f.c.correction, f.c.comment, f.c.created_at.label("rated_at"))
            .select_from(join(f, f.c.request_id == i.c.request_id))
            .where(clock >= since)
            .order_by(clock)
        )
        if until is not None:
            query = query.where(clock < until)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [Answer(**row) for row in rows]
