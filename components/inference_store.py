"""The inference log and user feedback: a durable store the monitor reads.

Generations are queued and written by a background thread, so logging never slows a request.
A write that fails (the database locked by another process, a server briefly away) does not
lose the rows: they are appended to a spool file under `$FLYWHEEL_HOME/spool/` and written
later, with backoff; the spool of an earlier process is written when the next store opens.
`close()` drains the queue (and tries the spool once more), so a clean shutdown loses
nothing. SQLite in WAL mode under `$FLYWHEEL_HOME` by default; any SQLAlchemy URL through
`FLYWHEEL_FEEDBACK_DB`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Literal

from components.paths import feedback_db_url, spool_dir

Rating = Literal["up", "down"]
log = logging.getLogger("flywheel.store")
RETRY_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)  # then every 5 s while the database is away
FLUSH_TIMEOUT_S = 20.0  # how long feedback waits for its generation to reach the database


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
    memory_entry: str | None = None  # the correction-memory entry that answered, if one did
    trace_id: str | None = None  # the request's OpenTelemetry trace (32 hex digits)
    route: str | None = None  # where the router sent it: champion, scope, a model's name, off
    route_similarity: float | None = None  # to the champion's nearest training prompt


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


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreBusy(RuntimeError):
    """The database did not take writes in time; what was queued is kept in the spool."""


def open_engine(url: str | None = None) -> Any:
    """A SQLAlchemy engine on the feedback database (SQLite in WAL mode by default)."""
    from sqlalchemy import create_engine, event

    url = url or feedback_db_url()
    if url.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(url.removeprefix("sqlite:///")) or ".", exist_ok=True)
    engine = create_engine(url, future=True)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            cursor.execute("PRAGMA busy_timeout=2000")  # then the spool takes the rows
            cursor.close()

    return engine


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
        Column("memory_entry", String(40)),
        Column("trace_id", String(32)),
        Column("route", String(16)),
        Column("route_similarity", Float),
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
        from sqlalchemy import MetaData

        self.url = url or feedback_db_url()
        self.engine = open_engine(self.url)
        metadata = MetaData()
        self.inference, self.feedback = _tables(metadata)
        metadata.create_all(self.engine)
        self._add_missing_columns()
        digest = hashlib.sha256(self.engine.url.render_as_string().encode()).hexdigest()[:12]
        # One spool file per process, so two processes never write or remove each other's.
        self.spool = spool_dir() / f"inference-{digest}-{os.getpid()}.jsonl"
        self._spool_lock = threading.Lock()
        self._pending = 0  # queued or spooled rows not yet in the database
        self._written = threading.Condition()
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
        with self._written:
            self._pending += 1
        self._queue.put(record)

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        """Insert rows; a row already written (a replayed spool) is skipped, not an error."""
        from sqlalchemy import select

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

    def _spooled(self) -> list[dict[str, Any]]:
        if not self.spool.is_file():
            return []
        lines = self.spool.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def _spool_rows(self, rows: list[dict[str, Any]]) -> None:
        with self._spool_lock:
            self.spool.parent.mkdir(parents=True, exist_ok=True)
            with self.spool.open("a", encoding="utf-8") as handle:
                handle.writelines(json.dumps(r) + "\n" for r in rows)
                handle.flush()
                os.fsync(handle.fileno())

    def _write_spool(self) -> bool:
        """Write the spooled rows to the database; True when the spool is empty afterwards."""
        with self._spool_lock:
            rows = self._spooled()
            if not rows:
                return True
            try:
                self._insert(rows)
            except Exception as exc:  # still away; keep the spool for the next attempt
                log.warning(
                    "inference log: %d spooled rows still not written (%s)",
                    len(rows),
                    _first_line(exc),
                )
                return False
            self.spool.unlink()
        log.info("inference log: wrote %d spooled rows", len(rows))
        self._done(len(rows))
        return True

    def _done(self, n: int) -> None:
        with self._written:
            self._pending = max(0, self._pending - n)
            self._written.notify_all()

    def _adopt_orphaned_spools(self) -> None:
        """Take over the spool files of processes that ended before writing them."""
        for path in self.spool.parent.glob(f"{self.spool.stem.rsplit('-', 1)[0]}-*.jsonl"):
            pid = int(path.stem.rsplit("-", 1)[1])
            if pid == os.getpid() or _alive(pid):
                continue
            claimed = path.with_suffix(f".adopted-{os.getpid()}")
            try:
                path.rename(claimed)  # atomic: only one process adopts a spool
            except OSError:
                continue
            rows = [json.loads(line) for line in claimed.read_text().splitlines() if line.strip()]
            self._spool_rows(rows)
            claimed.unlink()
            with self._written:
                self._pending += len(rows)

    def _next_batch(self, timeout: float) -> list[InferenceRecord | None]:
        try:
            batch = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        while not self._queue.empty() and len(batch) < 256:
            batch.append(self._queue.get_nowait())
        return batch

    def _write(self, rows: list[dict[str, Any]]) -> bool:
        """Spooled rows first, then `rows`; what the database refuses goes to the spool."""
        if self._write_spool():
            if not rows:
                return True
            try:
                self._insert(rows)
            except Exception as exc:
                log.warning("inference log: database unavailable (%s); spooling", _first_line(exc))
            else:
                self._done(len(rows))
                return True
        if rows:
            self._spool_rows(rows)
        return False

    def _drain(self) -> None:
        with self._written:  # a spool this process left (a store opened and closed before)
            self._pending += len(self._spooled())
        if self.spool.parent.is_dir():
            self._adopt_orphaned_spools()
        failures = 0
        stopping = False
        while not (stopping and self._queue.empty()):
            wait = RETRY_BACKOFF_S[min(failures, len(RETRY_BACKOFF_S) - 1)]
            batch = self._next_batch(wait)
            stopping = stopping or None in batch
            ok = self._write([asdict(r) for r in batch if r is not None])
            failures = 0 if ok else failures + 1
            for _ in batch:
                self._queue.task_done()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every logged generation is in the database; False on timeout."""
        with self._written:
            return self._written.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        """Write what is queued (the spool gets one last try), then stop the writer.

        Bounded by the database's busy timeout: each write waits at most that long, and rows
        it still refuses stay in the spool, which the next store on this database writes.
        """
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join()
        if not self._write_spool():
            log.warning("inference log: %s kept for the next start", self.spool)
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

        if not self.flush(timeout=FLUSH_TIMEOUT_S):  # the generation may still be queued
            raise StoreBusy("the inference log is still being written; retry shortly")
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
        from sqlalchemy import select

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
        from sqlalchemy import select

        self.flush(FLUSH_TIMEOUT_S)
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
