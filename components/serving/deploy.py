"""Deploy a registered version: start or hot-swap the service, smoke-test it, and roll back
(alias and serving model) if anything fails. A canary is served beside the champion under the
name `canary` and ended by `end_canary` (the monitor's verdict).

The service is `bentoml serve` of this repository (bentofile.yaml) with the version pinned by
`FLYWHEEL_MODEL_URI`; a Bento is built only where a container is made (`make bento`).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from components.paths import bentoml_home, flywheel_home, service_log_file, service_pid_file
from components.process import Server, ServerError, answers, stop_group
from components.registry.aliases import CANARY, CHAMPION, point
from components.registry.aliases import end_canary as record_canary_verdict
from components.serving.auth import admin_key
from components.settings import settings

STARTUP_TIMEOUT_S = 300
# On SIGTERM the service refuses new requests (503) and gives those in flight this long to
# finish before they are cut; then it flushes the inference log and exits.
DRAIN_TIMEOUT_S = 30
SHUTDOWN_TIMEOUT_S = DRAIN_TIMEOUT_S + 15  # the drain, the log flush and the process tree


class DeployError(RuntimeError):
    """The deploy failed; the message says why and what was restored."""


@dataclass
class DeployResult:
    model_name: str
    version: str
    url: str
    action: str  # "started" or "swapped"
    smoke_latency_ms: float
    memory: str = ""  # what the check of the memory against the new weights did
    served_as: str = CHAMPION  # or canary

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def service_env(profile: str, model_uri: str | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "FLYWHEEL_PROFILE": profile,
        "FLYWHEEL_HOME": str(flywheel_home()),
        "BENTOML_HOME": os.environ.get("BENTOML_HOME", str(bentoml_home())),
        "BENTOML_DO_NOT_TRACK": "true",
    }
    if model_uri:
        env["FLYWHEEL_MODEL_URI"] = model_uri
    return env


def client_auth() -> dict[str, str]:
    """The headers the project's own calls to the clients' routes send: the shared API key,
    the admin key where clients have named keys (a key file holds only their hashes), or
    none on an open service."""
    config = settings()
    if config.api_key:
        return {"authorization": f"Bearer {config.api_key}"}
    return _admin_auth() if config.api_keys_file else {}


def _admin_auth() -> dict[str, str]:
    return {"authorization": f"Bearer {admin_key()}"}


def is_ready(url: str) -> bool:
    return answers(f"{url}/readyz")


def _pid_file() -> Path:
    return service_pid_file()


def serve_command(port: int) -> list[str]:
    """`bentoml serve` of the repository's service (bentofile.yaml) on `port`."""
    return [
        *(sys.executable, "-m", "bentoml", "serve", ".", "--port", str(port)),
        *("--timeout-graceful-shutdown", str(DRAIN_TIMEOUT_S)),
    ]


def start_service(profile: str, model_uri: str | None, port: int) -> int:
    """Start `bentoml serve` detached (it outlives this process); wait until it is ready.
    `model_uri` pins the champion (default: the profile's `serve.models`)."""
    server = Server.start(
        "the service",
        serve_command(port),
        f"http://127.0.0.1:{port}/readyz",
        service_log_file(),
        env=service_env(profile, model_uri),
    )
    _pid_file().write_text(str(server.pid))
    try:
        server.wait_ready(STARTUP_TIMEOUT_S)
    except ServerError as exc:
        _pid_file().unlink(missing_ok=True)
        raise DeployError(str(exc)) from None
    return server.pid


def stop_service() -> bool:
    """Stop the service this home started (SIGTERM: it drains and flushes the log)."""
    if not _pid_file().is_file():
        return False
    pid = int(_pid_file().read_text())
    _pid_file().unlink()
    return stop_group(pid, SHUTDOWN_TIMEOUT_S)


def swap_model(url: str, model_uri: str, served_as: str = CHAMPION) -> str:
    """Tell the running service to load, warm up and serve `model_uri` as `served_as`."""
    response = httpx.post(
        f"{url}/admin/reload",
        json={"model_uri": model_uri, "model": served_as},
        headers=_admin_auth(),
        timeout=STARTUP_TIMEOUT_S,
    )
    if response.status_code != 200:
        raise DeployError(f"the service could not load {model_uri}: {response.text[:500]}")
    return str(response.json()["version"])


def unload_model(url: str, name: str) -> bool:
    """Stop serving the model `name` (not the champion); False if it was not served."""
    response = httpx.delete(f"{url}/admin/models/{name}", headers=_admin_auth(), timeout=60)
    if response.status_code not in (200, 404):
        raise DeployError(f"the service could not unload {name}: {response.text[:300]}")
    return response.status_code == 200


def smoke_test(url: str, expected_version: str, served_as: str = CHAMPION) -> float:
    """Ready, one generation by `served_as`, and the new version answering; returns its
    latency in ms."""
    if not is_ready(url):
        raise DeployError("smoke test: /readyz is not 200")
    started = time.perf_counter()
    response = httpx.post(
        f"{url}/generate",
        headers={**client_auth(), "x-flywheel-memory": "off"},
        timeout=120,
        json={"prompt": "How do I run the tests?", "max_new_tokens": 8, "model": served_as},
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


def roll_out(
    model_name: str, version: str, profile: str, port: int, served_as: str = CHAMPION
) -> tuple[str, str]:
    """Serve the version as `served_as` in the running service (a swap), or start one; returns
    (url, action). A service started for a canary serves the champion and the canary from
    their aliases."""
    url = f"http://127.0.0.1:{port}"
    uri = f"models:/{model_name}/{version}"
    if is_ready(url):
        swap_model(url, uri, served_as)
        return url, "swapped"
    start_service(profile, uri if served_as == CHAMPION else None, port)
    return url, "started"


def end_canary(model_name: str, version: str, url: str, decision: str, reason: str) -> str:
    """The monitor's verdict on the canary `version` ("promoted" or "rolled back"), recorded
    on the version like the gate's (`canary.decision`, `canary.reason`); the canary alias goes,
    a promoted canary becomes champion, and the service stops serving it as a canary (a
    promoted one is swapped in as champion first, by the deploy flow). Says what was done."""
    record_canary_verdict(model_name, version, decision, reason)
    try:
        unloaded = unload_model(url, CANARY) if is_ready(url) else False
    except (DeployError, httpx.HTTPError) as exc:
        return f"canary v{version} {decision}; the service still serves it as canary ({exc})"
    served = "no longer served as canary" if unloaded else "was not being served"
    return f"canary v{version} {decision}: {served}"


def roll_back(model_name: str, previous: str | None, profile: str, port: int, action: str) -> str:
    """Restore the previous champion alias and serving model; says what was done."""
    if previous is None:
        if action == "started":
            stop_service()
        return "no previous champion to restore; the new service was stopped"

    point(model_name, CHAMPION, previous)
    uri = f"models:/{model_name}/{previous}"
    url = f"http://127.0.0.1:{port}"
    if action == "started":
        stop_service()
        start_service(profile, uri, port)
    elif is_ready(url):
        current = httpx.get(f"{url}/v1/models", headers=client_auth()).json()["data"][0]["version"]
        if current != previous:
            swap_model(url, uri)
    return f"champion alias and serving model restored to version {previous}"
