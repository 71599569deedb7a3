"""Shared fixtures: a fresh FLYWHEEL_HOME per test, one shared model cache, offline hubs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    # Set before any test module imports prefect, transformers or mlflow.
    session_home = REPO_ROOT / ".flywheel" / "test-session"
    os.environ.setdefault("FLYWHEEL_MODEL_CACHE", str(REPO_ROOT / ".flywheel" / "models"))
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
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return folder


@pytest.fixture(scope="session")
def tiny_base():
    """The tiny random Llama with the real SmolLM2 tokenizer, built once per cache."""
    from components.base_model import resolve_base_model
    from components.config import ModelConfig

    return resolve_base_model(ModelConfig(base_model="tiny-random-llama"))


@pytest.fixture(scope="session")
def tokenizer(tiny_base):
    from components.finetune import load_tokenizer

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
