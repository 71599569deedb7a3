"""Shared fixtures: a fresh FLYWHEEL_HOME per test, one shared model cache, offline hubs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def state_home() -> Path:
    return Path(os.environ.get("FLYWHEEL_HOME", REPO_ROOT / ".flywheel")).resolve()


# Caches of the tools themselves: ignored by git and not state of the running system.
TOOL_CACHES = ("__pycache__/", ".ruff_cache/", ".mypy_cache/")


def files_outside_home(home: Path | None = None) -> set[str]:
    """Untracked and ignored files in the repository outside `home` (default FLYWHEEL_HOME)
    and the virtual environments."""
    import subprocess

    listed = subprocess.run(  # -z: NUL-separated, paths as they are (no quoting)
        ["git", "status", "--porcelain", "-z", "--ignored", "--untracked-files=all"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    home = state_home()
    inside = (
        home.relative_to(REPO_ROOT).as_posix() + "/" if home.is_relative_to(REPO_ROOT) else None
    )
    paths = {line[3:] for line in listed if line[:2] in ("??", "!!")}
    return {
        path
        for path in paths
        if not path.startswith((".venv/", ".venv-labelstudio/"))
        and not (inside and path.startswith(inside))
        and not any(cache in f"/{path}" for cache in TOOL_CACHES)
    }


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_BEFORE] = files_outside_home()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if it wrote anything into the repository outside FLYWHEEL_HOME."""
    before = session.config.stash.get(_BEFORE, None)
    if before is None:
        return
    written = sorted(files_outside_home() - before)
    if written:
        print(f"\nfiles written outside FLYWHEEL_HOME ({state_home()}):", *written, sep="\n  ")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_BEFORE = pytest.StashKey[set]()


def pytest_configure(config: pytest.Config) -> None:
    # Set before any test module imports prefect, transformers or mlflow.
    session_home = state_home() / "test-session"
    if not config.option.basetemp:  # tests' temporary folders are state too
        config.option.basetemp = str(state_home() / "pytest")
    os.environ.setdefault("FLYWHEEL_MODEL_CACHE", str(state_home() / "models"))
    os.environ.setdefault("MPLCONFIGDIR", str(state_home() / "matplotlib"))
    os.environ.setdefault("HF_HOME", str(state_home() / "huggingface"))
    os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(state_home() / "hypothesis"))
    os.environ["HF_HUB_OFFLINE"] = "1"  # any accidental hub access fails loudly
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("PREFECT_HOME", str(session_home / "prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect won't
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["DO_NOT_TRACK"] = "1"
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import importlib.util

    has_cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        has_cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh FLYWHEEL_HOME (and so a fresh SQLite MLflow store) for one test."""
    folder = tmp_path / "home"
    monkeypatch.setenv("FLYWHEEL_HOME", str(folder))
    # Set, not deleted: mlflow.set_tracking_uri exports the variable, and only a setenv
    # is undone after the test, so no other test inherits this home's registry.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri(folder))
    monkeypatch.setenv("FLYWHEEL_CURATED_DIR", str(folder / "curated"))  # not the repo's data/
    return folder


def sqlite_uri(home: Path) -> str:
    return f"sqlite:///{home / 'mlflow.db'}"


@pytest.fixture(scope="session")
def tiny_base():
    """The tiny random Llama with the real SmolLM2 tokenizer, built once per cache."""
    from components.config import ModelConfig
    from components.model.base_model import resolve_base_model

    return resolve_base_model(ModelConfig(base_model="tiny-random-llama"))


@pytest.fixture(scope="session")
def tokenizer(tiny_base):
    from components.model.chat import load_tokenizer

    return load_tokenizer(tiny_base.path)


@pytest.fixture(scope="session")
def tiny_config():
    from components.config import load_profile

    return load_profile("tiny")


@pytest.fixture(scope="session")
def prefect_server():
    """A real temporary Prefect server for flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def prefect_cli(env: dict[str, str], *args: str, timeout: int = 120) -> str:
    """Run `prefect *args` at the repository root with `env`; fail with its output."""
    return module_cli("prefect", env, *args, timeout=timeout)


def module_cli(module: str, env: dict[str, str], *args: str, timeout: int = 120) -> str:
    """Run `python -m <module> *args` at the repository root with `env`; fail with its
    output; returns what it printed."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def register_tiny_champion(home: Path, tiny_base, tiny_config) -> str:
    """Train a 2-step tiny adapter and register it as champion in `home`; returns its folder."""
    from components.evaluate.evaluation import Comparison
    from components.records import Example, read_jsonl, save_examples
    from components.registry.register import register_candidate
    from components.registry.tracking import RunLogger
    from components.train.finetune import finetune

    work = home / "work"
    support = read_jsonl(REPO_ROOT / "data/seed/support.jsonl")[:40]
    save_examples(work / "train.jsonl", [Example(r["instruction"], r["output"]) for r in support])
    config = tiny_config.model_copy(
        update={"train": tiny_config.train.model_copy(update={"max_steps": 2})}
    )
    adapter = finetune(config, tiny_base, str(work / "train.jsonl"), None, work / "ft").adapter_dir
    better = Comparison("perplexity", "base", 1.0, 2.0, -1.0, -1.5, -0.5, 0.95)
    run = RunLogger.start("flywheel", "fixture", {"profile": "tiny"})
    run.artifact(work / "train.jsonl", "data")  # its domain, for the monitor and the router
    register_candidate(
        run.run_id, tiny_config.registry.model_name, adapter, tiny_base, {"profile": "tiny"}, better
    )
    return adapter


class ServedService:
    """A real `bentoml serve` of the repository's service in a subprocess."""

    def __init__(self, home: Path, env: dict[str, str] | None = None) -> None:
        from components.process import Server
        from components.serving.deploy import serve_command

        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = home / "service.log"
        self.env = {
            **os.environ,
            "FLYWHEEL_HOME": str(home),
            "FLYWHEEL_PROFILE": "tiny",
            "MLFLOW_TRACKING_URI": sqlite_uri(home),
            "BENTOML_HOME": str(home / "bentoml"),
            "BENTOML_DO_NOT_TRACK": "true",
            **(env or {}),
        }
        self.server = Server.start(
            "bentoml serve", serve_command(self.port), f"{self.url}/readyz", self.log_path, self.env
        )
        self.process = self.server.process

    def wait_ready(self, timeout: float = 180) -> None:
        self.server.wait_ready(timeout)

    def stop(self) -> int | None:
        return self.server.stop()


@pytest.fixture(scope="module")
def champion_home(tmp_path_factory, tiny_base, tiny_config):
    """A FLYWHEEL_HOME with a registered tiny champion, for service and deploy tests."""
    home = tmp_path_factory.mktemp("served-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLYWHEEL_HOME", str(home))
        patch.setenv("MLFLOW_TRACKING_URI", sqlite_uri(home))
        register_tiny_champion(home, tiny_base, tiny_config)
        yield home


@pytest.fixture(scope="module")
def served(champion_home):
    """`bentoml serve` of the tiny champion; stopped after the module."""
    service = ServedService(champion_home)
    try:
        service.wait_ready()
        yield service
    finally:
        service.stop()
