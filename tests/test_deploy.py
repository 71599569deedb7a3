"""The deploy flow against a real service: start, hot swap (checking the memory against the new
weights), and roll back a broken version."""

import shutil
from pathlib import Path

import httpx
import pytest

from components.config import load_profile
from components.evaluate.evaluation import Comparison
from components.registry.aliases import CHAMPION
from components.registry.register import register_candidate
from components.registry.tracking import RunLogger
from components.serving.deploy import DeployError, stop_service
from tests.conftest import free_port, register_tiny_champion

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
BETTER = Comparison("perplexity", "champion", 1.0, 2.0, -1.0, -1.5, -0.5, 0.95)


def _register(adapter: str, tiny_base, name: str) -> str:
    run = RunLogger.start("flywheel", "deploy-test", {"profile": "tiny"})
    return register_candidate(
        run.run_id, name, adapter, tiny_base, {"profile": "tiny"}, BETTER
    ).version


def _served_version(url: str) -> str:
    response = httpx.post(f"{url}/generate", json={"prompt": "hi", "max_new_tokens": 2})
    assert response.status_code == 200
    return response.headers["x-model-version"]


def _remember_facts() -> list[str]:
    """Two reviewed facts the tiny random model does not know (it answers with no words)."""
    from components.config import load_profile
    from components.memory.store import CorrectionMemory

    memory = CorrectionMemory(load_profile("tiny").memory)
    try:
        return [
            memory.remember(q, a, "label-studio", f"review-{i}", "1").id
            for i, (q, a) in enumerate(
                [
                    ("Which port does staging MLflow use?", "Staging MLflow is on port 5077."),
                    ("Who approves a champion?", "Lena Fischer approves every champion."),
                ]
            )
        ]
    finally:
        memory.close()


def _statuses() -> dict[str, str]:
    from components.config import load_profile
    from components.memory.store import CorrectionMemory

    memory = CorrectionMemory(load_profile("tiny").memory)
    try:
        return {e.id: e.status for e in memory.entries()}
    finally:
        memory.close()


def test_deploy_starts_swaps_and_rolls_back(home, prefect_server, tiny_base, tiny_config) -> None:
    from mlflow.tracking import MlflowClient

    from flows.deploy import deploy

    name = tiny_config.registry.model_name
    adapter = register_tiny_champion(home, tiny_base, tiny_config)  # version 1, champion
    port = free_port()
    try:
        first = deploy(name, "1", load_profile("tiny"), port=port)
        assert first["action"] == "started"
        # It serves the repository pinned to the version; no Bento is built that it never serves.
        assert not (home / "bentoml" / "bentos").exists()
        url = first["url"]
        assert _served_version(url) == "1"

        # After the swap the new weights are asked each active entry's question; these two
        # facts the tiny model does not state stay served (test_service_logic: retiring).
        facts = _remember_facts()
        assert _register(adapter, tiny_base, name) == "2"
        second = deploy(name, "2", load_profile("tiny"), previous_champion="1", port=port)
        assert second["action"] == "swapped"
        assert _served_version(url) == "2"
        assert second["memory"] == "memory: 0 of 2 active entries retired"
        assert _statuses() == dict.fromkeys(facts, "active")

        broken = Path(home / "broken-adapter")
        shutil.copytree(adapter, broken)
        (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
        assert _register(str(broken), tiny_base, name) == "3"  # the gate made it champion
        with pytest.raises(DeployError, match=r"could not load .*restored to version 2"):
            deploy(name, "3", load_profile("tiny"), previous_champion="2", port=port)

        assert str(MlflowClient().get_model_version_by_alias(name, CHAMPION).version) == "2"
        assert _served_version(url) == "2"  # the old version kept serving throughout
    finally:
        stop_service()
