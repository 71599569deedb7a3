"""Servers in child processes: start one, wait until it answers, stop it within a bound.

The one way Flywheel runs a server it depends on (`bentoml serve`, Label Studio), from the
deploy flow, the benchmark, the Label Studio launcher and the tests alike.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from components.paths import REPO_ROOT


class ServerError(RuntimeError):
    """A server exited while starting, or did not become ready in time."""


def answers(url: str, timeout: float = 3.0) -> bool:
    """True when `url` answers 200."""
    import httpx

    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def stop_group(pid: int, grace_s: float = 60.0) -> bool:
    """SIGTERM the process group `pid` leads, SIGKILL it after `grace_s`; False if it was gone."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    return True


@dataclass
class Server:
    """A server process in its own session (so it can be stopped as a group) with a log file."""

    name: str
    process: subprocess.Popen
    ready_url: str
    log_path: Path

    @classmethod
    def start(
        cls,
        name: str,
        command: Sequence[str],
        ready_url: str,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path = REPO_ROOT,
    ) -> Server:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a") as log:
            process = subprocess.Popen(
                list(command),
                cwd=cwd,
                env=dict(env) if env is not None else None,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(name, process, ready_url, log_path)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 300.0, poll_s: float = 0.5) -> None:
        """Poll `ready_url` until it answers 200; fail at once if the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(
                    f"{self.name} exited with code {self.process.returncode} while starting "
                    f"(log: {self.log_path}):\n{self.log_tail()}"
                )
            if answers(self.ready_url, timeout=2.0):
                return
            time.sleep(poll_s)
        self.stop()
        raise ServerError(
            f"{self.name} was not ready at {self.ready_url} after {timeout:.0f} s "
            f"(log: {self.log_path}):\n{self.log_tail()}"
        )

    def stop(self, grace_s: float = 60.0) -> int | None:
        """Stop the server's process group (SIGTERM, then SIGKILL after `grace_s`)."""
        if self.process.poll() is None:
            stop_group(self.process.pid, grace_s)
        try:
            return self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None
