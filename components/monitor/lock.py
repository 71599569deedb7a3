"""One retrain at a time on a machine: a file lock under the monitor's folder, held while a
retrain runs in the monitor's own process."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager

from components.paths import monitor_dir


@contextmanager
def retrain_lock(model_name: str) -> Iterator[bool]:
    """An exclusive lock on this machine, held while a retrain runs in-process."""
    path = monitor_dir() / f"{model_name}.retrain.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def lock_is_held(model_name: str) -> bool:
    """Whether a retrain of `model_name` holds the lock now."""
    with retrain_lock(model_name) as acquired:
        return not acquired
