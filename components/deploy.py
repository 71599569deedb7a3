"""Deploy a registered version: build a Bento, start or hot-swap the service, smoke-test it,
and roll back (alias and serving model) if anything fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from components.paths import REPO_ROOT, flywheel_home

STARTUP_TIMEOUT_S = 300


class DeployError(RuntimeError):
    """The deploy failed; the message says why and what was restored."""


@dataclass
class DeployResult:
    model_name: str
    version: str
    url: str
    action: str  # "started" or "swapped"
    bento_tag: str
    smoke_latency_ms: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def service_env(profile: str, model_uri: str | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "FLYWHEEL_PROFILE": profile,
        "FLYWHEEL_HOME": str(flywheel_home()),
        "BENTOML_HOME": os.environ.get("BENTOML_HOME", str(flywheel_home() / "bentoml")),
        "BENTOML_DO_NOT_TRACK": "true",
    }
    if model_uri:
        env["FLYWHEEL_MODEL_URI"] = model_uri
    return env


def _auth() -> dict[str, str]:
    key = os.environ.get("FLYWHEEL_API_KEY")
    return {"authorization": f"Bearer {key}"} if key else {}


def build_bento(model_name: str, version: str, profile: str) -> str:
    """`bentoml build`, tagged with the model version; returns the Bento tag.

    A Bento left with the same tag by an earlier build (another home sharing the Bento store,
    or a rebuild after a code change) is replaced.
    """
    tag_version = f"{model_name}-v{version}".replace("_", "-")
    subprocess.run(
        [sys.executable, "-m", "bentoml", "delete", "--yes", f"flywheel:{tag_version}"],
        cwd=REPO_ROOT,
        env=service_env(profile),
        capture_output=True,
        timeout=120,
    )  # fails harmlessly when there is no such Bento
    done = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--version", tag_version, "--output", "tag"],
        cwd=REPO_ROOT,
        env=service_env(profile),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise DeployError(f"bentoml build failed: {done.stderr[-1500:]}")
    return done.stdout.strip().splitlines()[-1].removeprefix("__tag__:")


def is_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def _pid_file() -> Path:
    return flywheel_home() / "service.pid"


def start_service(profile: str, model_uri: str, port: int) -> int:
    """Start `bentoml serve` detached (it outlives this process); wait until it is ready."""
    logs = flywheel_home() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / "service.log").open("a") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", ".", "--port", str(port)],
            cwd=REPO_ROOT,
            env=service_env(profile, model_uri),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _pid_file().write_text(str(process.pid))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DeployError(f"the service exited while starting; see {logs / 'service.log'}")
        if is_ready(url):
            return process.pid
        time.sleep(1)
    stop_service()
    raise DeployError(f"the service was not ready after {STARTUP_TIMEOUT_S}s")


def stop_service() -> bool:
    """Stop the service this home started (SIGTERM, so the inference log is flushed)."""
    if not _pid_file().is_file():
        return False
    pid = int(_pid_file().read_text())
    _pid_file().unlink()
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    for _ in range(60):
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.5)
    os.killpg(pid, signal.SIGKILL)
    return True


def swap_model(url: str, model_uri: str) -> str:
    """Tell the running service to load, warm up and switch to `model_uri`."""
    response = httpx.post(
        f"{url}/admin/reload",
        json={"model_uri": model_uri},
        headers=_auth(),
        timeout=STARTUP_TIMEOUT_S,
    )
    if response.status_code != 200:
        raise DeployError(f"the service could not load {model_uri}: {response.text[:500]}")
    return str(response.json()["version"])


def smoke_test(url: str, expected_version: str) -> float:
    """Ready, one generation, and the new version answering; returns its latency in ms."""
    if not is_ready(url):
        raise DeployError("smoke test: /readyz is not 200")
    started = time.perf_counter()
    response = httpx.post(
        f"{url}/generate",
        headers=_auth(),
        timeout=120,
        json={"prompt": "How do I run the tests?", "max_new_tokens": 8},
    )
    latency = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise DeployError(
            f"smoke test: /generate answered {response.status_code}: {response.text[:300]}"
        )
    served = response.headers.get("x-model-version")
    if served != expected_version or response.json().get("model_version") != expected_version:
        raise DeployError(
            f"smoke test: expected version {expected_version}, the service answered with {served}"
        )
    return round(latency, 1)


def roll_out(model_name: str, version: str, profile: str, port: int) -> tuple[str, str]:
    """Swap the running service to the version, or start one; returns (url, action)."""
    url = f"http://127.0.0.1:{port}"
    uri = f"models:/{model_name}/{version}"
    if is_ready(url):
        swap_model(url, uri)
        return url, "swapped"
    start_service(profile, uri, port)
    return url, "started"


def roll_back(model_name: str, previous: str | None, profile: str, port: int, action: str) -> str:
    """Restore the previous champion alias and serving model; says what was done."""
    from components.register import CHAMPION
    from components.tracking import configure_mlflow

    if previous is None:
        if action == "started":
            stop_service()
        return "no previous champion to restore; the new service was stopped"
    from mlflow.tracking import MlflowClient

    configure_mlflow()
    MlflowClient().set_registered_model_alias(model_name, CHAMPION, previous)
    uri = f"models:/{model_name}/{previous}"
    url = f"http://127.0.0.1:{port}"
    if action == "started":
        stop_service()
        start_service(profile, uri, port)
    elif is_ready(url):
        current = httpx.get(f"{url}/v1/models", headers=_auth()).json()["data"][0]["version"]
        if current != previous:
            swap_model(url, uri)
    return f"champion alias and serving model restored to version {previous}"
