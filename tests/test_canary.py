"""The champion/challenger canary: a share of users on a promoted candidate, and the monitor
promoting it or rolling it back on what those users said, with the reason on the version."""

import time

import httpx
import pytest

from components.config import CanaryConfig, MonitorConfig, load_profile
from components.inference.records import Answer
from tests.conftest import register_tiny_champion

CANARY = CanaryConfig(enabled=True, share=0.5, min_feedback=10, min_requests=10)
MONITOR = MonitorConfig()


def _answers(version: str, ratings: str, latency_ms: float = 100.0, **fields) -> list[Answer]:
    """One answer per character of `ratings`: u (up), d (down), - (not rated)."""
    return [
        Answer(
            request_id=f"{version}-{i}-{time.monotonic_ns()}",
            created_at=float(i),
            model_version=version,
            endpoint="generate",
            prompt="q",
            response="a",
            prompt_tokens=1,
            completion_tokens=1,
            latency_ms=latency_ms,
            rating={"u": "up", "d": "down"}.get(mark),
            **fields,
        )
        for i, mark in enumerate(ratings)
    ]


def test_a_canary_with_more_thumbs_down_is_rolled_back() -> None:
    from components.monitor.canary import judge_canary

    answers = _answers("2", "d" * 9 + "u" * 3) + _answers("1", "d" * 2 + "u" * 28)
    verdict = judge_canary(answers, "2", "1", CANARY, MONITOR)
    assert verdict.action == "roll back"
    assert "75% thumbs-down (9/12), significantly above the champion's 7%" in verdict.reason
    assert verdict.p_value is not None and verdict.p_value < MONITOR.significance


def test_a_canary_as_good_as_the_champion_is_promoted_once_rated_enough() -> None:
    from components.monitor.canary import judge_canary

    champion = _answers("1", "d" * 4 + "u" * 36)
    early = judge_canary(_answers("2", "d" + "u" * 5) + champion, "2", "1", CANARY, MONITOR)
    assert early.action == "wait" and "6 of 10 ratings needed" in early.reason
    enough = _answers("2", "d" * 2 + "u" * 10)
    verdict = judge_canary(enough + champion, "2", "1", CANARY, MONITOR)
    assert verdict.action == "promote"
    assert "not significantly above the champion's 10% thumbs-down (4/40)" in verdict.reason
    assert "p95 latency 100 ms vs the champion's 100 ms (1.00x)" in verdict.reason


def test_a_slower_canary_is_rolled_back_and_only_model_answers_count() -> None:
    from components.monitor.canary import judge_canary

    slow = _answers("2", "u" * 12, latency_ms=400)
    # Corrections from the memory and scope replies are fast and all thumbs-up: not the model's.
    fixed = _answers("1", "u" * 50, latency_ms=1, memory_entry="m1") + _answers(
        "1", "u" * 50, latency_ms=1, route="scope"
    )
    verdict = judge_canary(slow + _answers("1", "u" * 12) + fixed, "2", "1", CANARY, MONITOR)
    assert verdict.action == "roll back"
    assert "p95 latency 400 ms vs the champion's 100 ms (4.00x), over 1.5x" in verdict.reason
    assert verdict.champion.answers == 12


def test_without_champion_ratings_the_canary_is_held_to_the_baseline() -> None:
    from components.monitor.canary import judge_canary

    verdict = judge_canary(_answers("2", "d" * 8 + "u" * 4), "2", "1", CANARY, MONITOR)
    assert verdict.action == "roll back" and "the baseline 20%" in verdict.reason


# -- end to end: a real service, the deploy flow and the monitor flow ------------------------


def _side_of(url: str, user: str) -> tuple[str, str]:
    """(served model, version) that answered `user`."""
    response = httpx.post(
        f"{url}/generate",
        json={"prompt": "How do I run the tests?", "max_new_tokens": 2, "user": user},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return response.headers["x-flywheel-model"], response.json()["request_id"]


def _traffic(url: str, users: list[str], rate: dict[str, str]) -> dict[str, int]:
    """Each user asks twice (and lands on the same side both times); each answer is rated
    as `rate` says for its side. Returns the answers per side."""
    per_side: dict[str, int] = {}
    for user in users:
        (side, first), (again, second) = _side_of(url, user), _side_of(url, user)
        assert side == again, f"{user} moved from {side} to {again}"
        for request_id in (first, second):
            body = {"request_id": request_id, "rating": rate[side]}
            assert httpx.post(f"{url}/feedback", json=body).status_code == 200
        per_side[side] = per_side.get(side, 0) + 2
    return per_side


@pytest.mark.e2e
@pytest.mark.slow
def test_the_monitor_rolls_a_canary_back_and_promotes_the_next(
    home, prefect_server, tiny_base, tiny_config, monkeypatch
) -> None:
    from mlflow.tracking import MlflowClient

    from components.evaluate.evaluation import Comparison
    from components.registry.aliases import CANARY as ALIAS
    from components.registry.aliases import CHAMPION
    from components.registry.register import register_candidate
    from components.registry.tracking import RunLogger
    from components.serving.deploy import stop_service
    from flows.deploy import deploy
    from flows.monitor import monitor
    from tests.conftest import free_port

    settings = (
        "serve.canary.enabled=true serve.canary.share=0.5 serve.canary.min_feedback=10 "
        "serve.canary.max_latency_factor=20"
    )
    monkeypatch.setenv("FLYWHEEL_SET", settings)
    name = tiny_config.registry.model_name
    adapter = register_tiny_champion(home, tiny_base, tiny_config)  # version 1, champion
    better = Comparison("perplexity", "champion", 1.0, 2.0, -1.0, -1.5, -0.5, 0.95)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("FLYWHEEL_SERVICE_URL", url)
    client = MlflowClient()

    def candidate() -> str:
        """A version the offline gate promotes: with the canary on, to `canary`."""
        run = RunLogger.start("flywheel", "canary-test", {"profile": "tiny"})
        registered = register_candidate(
            run.run_id, name, adapter, tiny_base, {"profile": "tiny"}, better, promote_to=ALIAS
        )
        assert registered.aliases == ["challenger", "canary"]
        return registered.version

    def served() -> dict[str, str]:
        models = httpx.get(f"{url}/v1/models").json()["data"]
        return {m["id"]: m["version"] for m in models}

    try:
        assert deploy(name, "1", load_profile("tiny"), port=port)["action"] == "started"
        assert candidate() == "2"
        started = deploy(name, "2", load_profile("tiny"), port=port, canary=True)
        assert (started["served_as"], started["action"]) == ("canary", "swapped")
        assert served() == {name: "1", "champion": "1", "canary": "2"}

        # Canary users rate every answer down, champion users up: rolled back.
        sides = _traffic(url, [f"a{i}" for i in range(24)], {"canary": "down", "champion": "up"})
        assert sides["canary"] >= 10 and sides["champion"] >= 10
        outcome = monitor(profile="tiny", retrain="off")["canary"]
        assert outcome["decision"] == "rolled back"
        assert "significantly above the champion's 0% thumbs-down" in outcome["reason"]
        tags = client.get_model_version(name, "2").tags
        assert tags["canary.decision"] == "rolled back"
        assert tags["canary.reason"] == outcome["reason"]
        assert ALIAS not in client.get_registered_model(name).aliases
        assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
        assert served() == {name: "1", "champion": "1"}
        assert _side_of(url, "a0")[0] == "champion"

        # The next candidate does as well as the champion: promoted and swapped in.
        assert candidate() == "3"
        deploy(name, "3", load_profile("tiny"), port=port, canary=True)
        assert served()["canary"] == "3"
        _traffic(url, [f"b{i}" for i in range(24)], {"canary": "up", "champion": "up"})
        waiting = monitor(profile="tiny", retrain="off")["canary"]
        assert waiting["decision"] == "promoted", waiting
        assert "not significantly above the champion's 0% thumbs-down" in waiting["reason"]
        assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "3"
        assert client.get_model_version(name, "3").tags["canary.decision"] == "promoted"
        assert served() == {name: "3", "champion": "3"}
        assert monitor(profile="tiny", retrain="off")["canary"] is None  # none left
    finally:
        stop_service()
