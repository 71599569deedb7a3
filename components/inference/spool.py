"""A background writer that never loses a row: rows are queued and written by one thread;
rows the database refuses (locked by another process, a server briefly away) are appended to
a spool file and written later, with backoff. The spool of a process that ended is adopted by
the next writer on the same database."""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("flywheel.store")
RETRY_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)  # then every 5 s while the database is away
BATCH = 256  # rows written in one transaction at most

Row = dict[str, Any]


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


class SpooledWriter:
    """Writes rows through `insert` on a thread of its own. `spool` is this process's spool
    file (`<name>-<pid>.jsonl`: two processes never write or remove each other's)."""

    def __init__(self, insert: Callable[[list[Row]], None], spool: Path) -> None:
        self.insert = insert
        self.spool = spool
        self._spool_lock = threading.Lock()
        self._pending = 0  # queued or spooled rows not yet in the database
        self._written = threading.Condition()
        self._queue: queue.Queue[Row | None] = queue.Queue()
        self._thread = threading.Thread(target=self._drain, name="inference-log", daemon=True)
        self._thread.start()

    def put(self, row: Row) -> None:
        """Queue a row for writing; returns immediately."""
        with self._written:
            self._pending += 1
        self._queue.put(row)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every row put so far is in the database; False on timeout."""
        with self._written:
            return self._written.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> bool:
        """Write what is queued (the spool gets one last try), then stop; False when rows
        stay in the spool for the next writer on this database."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        return self._write_spool()

    def _spooled(self) -> list[Row]:
        if not self.spool.is_file():
            return []
        lines = self.spool.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def _spool_rows(self, rows: list[Row]) -> None:
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
                self.insert(rows)
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

    def _next_batch(self, timeout: float) -> list[Row | None]:
        try:
            batch = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        while not self._queue.empty() and len(batch) < BATCH:
            batch.append(self._queue.get_nowait())
        return batch

    def _write(self, rows: list[Row]) -> bool:
        """Spooled rows first, then `rows`; what the database refuses goes to the spool."""
        if self._write_spool():
            if not rows:
                return True
            try:
                self.insert(rows)
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
            ok = self._write([row for row in batch if row is not None])
            failures = 0 if ok else failures + 1
            for _ in batch:
                self._queue.task_done()
