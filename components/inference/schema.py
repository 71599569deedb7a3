"""The feedback database: its engine (SQLite in WAL mode by default, any SQLAlchemy URL through
`FLYWHEEL_FEEDBACK_DB`), its tables, and bringing a store written by an older Flywheel up to
date."""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import (
    Column,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    inspect,
    text,
)

from components.paths import feedback_db_url


def open_engine(url: str | None = None) -> Any:
    """A SQLAlchemy engine on the feedback database (SQLite in WAL mode by default)."""
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


def tables(metadata: MetaData) -> tuple[Table, Table]:
    """The `inference` and `feedback` tables."""
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
        Column("memory_note", Text),
        Column("trace_id", String(32)),
        Column("route", String(16)),
        Column("route_similarity", Float),
        Column("error", Text),
    )
    feedback = Table(
        "feedback",
        metadata,
        Column("request_id", String(64), ForeignKey("inference.request_id"), primary_key=True),
        Column("rating", String(8), nullable=False),
        Column("correction", Text),
        Column("comment", Text),
        Column("created_at", Float, nullable=False, index=True),
        Column("client", String(64)),  # who sent it: `key:<name>` or `address:<hash>`
    )
    return inference, feedback


def add_missing_columns(engine: Any, table: Table) -> None:
    """Add the columns of `table` that an older store lacks (new columns are nullable)."""
    present = {c["name"] for c in inspect(engine).get_columns(table.name)}
    with engine.begin() as conn:
        for column in table.columns:
            if column.name not in present:
                kind = column.type.compile(engine.dialect)
                conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}"))
