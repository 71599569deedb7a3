"""Several models in one service: chosen by name and by the router, swapped and unloaded by
name, within a memory budget; and who goes to the canary."""

import statistics
import time

import httpx
import pytest

from service.generator_client import ERROR_STATUS
from tests.conftest import ServedService, sqlite_uri

# The tiny champion (version 1) beside the base model as the general model, which the router
# gives the questions outside the champion's domain.
FLEET = (
    "'serve.models={champion: \"@champion\", general: base}' "
    "serve.routing.enabled=true serve.routing.out_of_domain=general"
)
ON_TOPIC = "How do I start a training run?"
OFF_TOPIC = "What's the secret to a good pad thai?"


def test_a_user_stays_on_one_side_of_the_canary() -> None:
    from components.serving.fleet import to_canary

    users = [f"user-{i}" for i in range(4000)]
    sides = [to_canary(user, 0.1) for user in users]
    assert sides == [to_canary(user, 0.1) for user in users]  # sticky
    assert 0.08 < statistics.mean(sides) < 0.12  # the share
    # A larger share keeps everyone who was on the canary there.
    assert all(to_canary(user, 0.3) for user, side in zip(users, sides, strict=True) if side)
    draws = [to_canary(None, 0.1) for _ in range(4000)]  # no id: a draw per request
    assert 0.07 < statistics.mean(draws) < 0.13


@pytest.fixture
def champion_env(champion_home, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_HOME", str(champion_home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri(champion_home))
    monkeypatch.setenv("FLYWHEEL_PROFILE", "tiny")
    return champion_home


def test_the_memory_budget_refuses_a_model_that_does_not_fit(champion_env) -> None:
    from components.config import load_profile
    from components.serving.fleet import GB, BudgetExceeded, ModelSet
    from components.serving.protocol import GenerationInput

    config = load_profile("tiny")
    models = ModelSet(config, warmup=False)
    champion = models.load("champion", "@champion")
    # Room for one and a half tiny models: the champion fits, a second model does not.
    budget = champion.engine.memory_bytes * 1.5 / GB
    serve = config.serve.model_copy(update={"memory_budget_gb": budget})
    models.config = config.model_copy(update={"serve": serve})
    with pytest.raises(BudgetExceeded, match=r"general needs .* over serve.memory_budget_gb"):
        models.load("general", "base")
    assert [row["name"] for row in models.listing()] == ["champion"]
    assert models.load("champion", "models:/flywheel-llm-tiny/1").version == "1"  # a swap fits
    [out] = models.generate([GenerationInput(text="hi", max_new_tokens=2)])
    assert out.error is None and (out.model, out.model_version) == ("champion", "1")


def test_a_batch_for_several_models_is_answered_by_each(champion_env) -> None:
    from components.config import load_profile
    from components.serving.fleet import ModelSet
    from components.serving.protocol import GenerationInput

    models = ModelSet(load_profile("tiny"), warmup=False)
    models.load("champion", "@champion")
    models.load("general", "base")
    inputs = [
        GenerationInput(text="hi", max_new_tokens=2, model=name)
        for name in ("general", None, "champion", "nope", "flywheel-llm-tiny:1", "general")
    ]
    outputs = models.generate(inputs)
    assert [(o.model, o.model_version) for o in outputs] == [
        ("general", "base"),
        ("champion", "1"),
        ("champion", "1"),
        ("", ""),
        ("champion", "1"),
        ("general", "base"),
    ]
    assert (outputs[3].error_code, outputs[3].error_param, ERROR_STATUS[outputs[3].error_code]) == (
        "model_not_found",
        "model",
        404,
    )


@pytest.fixture(scope="module")
def fleet(champion_home):
    service = ServedService(champion_home, env={"FLYWHEEL_SET": FLEET})
    try:
        service.wait_ready()
        yield service
    finally:
        service.stop()


def _ask(url: str, prompt: str, **extra) -> httpx.Response:
    body = {"prompt": prompt, "max_new_tokens": 3, **extra}
    response = httpx.post(f"{url}/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response


def _listed(url: str) -> dict[str, dict]:
    return {m["id"]: m for m in httpx.get(f"{url}/v1/models").json()["data"]}


def _wait_for(check, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


@pytest.mark.e2e
@pytest.mark.slow
def test_two_models_served_at_once_chosen_by_name_and_by_the_router(fleet) -> None:
    from openai import OpenAI

    url = fleet.url
    _wait_for(lambda: _listed(url).get("general", {}).get("ready"), "the general model")
    listed = _listed(url)
    assert list(listed) == ["flywheel-llm-tiny", "champion", "general"]
    assert (listed["champion"]["version"], listed["general"]["version"]) == ("1", "base")
    assert listed["flywheel-llm-tiny"]["version"] == "1"  # the router's entry: the champion's

    # By name, on every route; the registered name leaves the choice to the router.
    general = _ask(url, ON_TOPIC, model="general")
    assert (general.headers["x-flywheel-model"], general.headers["x-model-version"]) == (
        "general",
        "base",
    )
    assert general.json()["model_version"] == "base"
    assert general.headers["x-flywheel-route"] == "off"  # named: not judged
    assert _ask(url, OFF_TOPIC, model="champion").headers["x-model-version"] == "1"
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    chat = client.chat.completions.with_raw_response.create(
        model="general", messages=[{"role": "user", "content": ON_TOPIC}], max_tokens=3
    )
    assert chat.headers["x-model-version"] == "base" and chat.parse().model == "general"
    assert client.models.retrieve("general").model_extra["version"] == "base"
    missing = httpx.post(f"{url}/generate", json={"prompt": "hi", "model": "nope"})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    assert "general" in missing.json()["error"]["message"]

    # By the router, once it knows the champion's domain.
    _wait_for(lambda: _ask(url, ON_TOPIC).headers["x-flywheel-route"] != "off", "the domain")
    kept, away = _ask(url, ON_TOPIC), _ask(url, OFF_TOPIC, model="flywheel-llm-tiny")
    assert (kept.headers["x-flywheel-route"], kept.headers["x-model-version"]) == ("champion", "1")
    assert (away.headers["x-flywheel-route"], away.headers["x-flywheel-model"]) == (
        "general",
        "general",
    )
    assert away.headers["x-model-version"] == "base"
    with client.chat.completions.with_streaming_response.create(
        model="flywheel-llm-tiny",
        messages=[{"role": "user", "content": OFF_TOPIC}],
        max_tokens=3,
        stream=True,
    ) as stream:
        assert stream.headers["x-model-version"] == "base"
        assert any(line.startswith("data: [DONE]") for line in stream.iter_lines())

    # The choice is in the inference log and the metrics.
    from components.inference.store import InferenceStore

    with InferenceStore() as store:
        logged = {a.request_id: a for a in store.answers_since(0)}
    assert (
        logged[away.json()["request_id"]].route,
        logged[away.json()["request_id"]].model_version,
    ) == ("general", "base")
    metrics = httpx.get(f"{url}/metrics").text
    assert 'flywheel_answers_total{model="general",model_version="base"}' in metrics
    assert 'flywheel_routes_total{route="general"}' in metrics


@pytest.mark.e2e
@pytest.mark.slow
def test_models_swap_roll_back_and_unload_by_name(fleet, champion_home) -> None:
    from components.serving.auth import admin_key

    url = fleet.url
    admin = {"authorization": f"Bearer {admin_key()}"}
    _wait_for(lambda: _listed(url).get("general", {}).get("ready"), "the general model")

    def reload(uri: str, model: str) -> httpx.Response:
        body = {"model_uri": uri, "model": model}
        return httpx.post(f"{url}/admin/reload", json=body, headers=admin, timeout=120)

    swapped = reload("models:/flywheel-llm-tiny/1", "general")
    assert swapped.status_code == 200 and swapped.json()["version"] == "1"
    assert _ask(url, "hi", model="general").headers["x-model-version"] == "1"
    assert _listed(url)["champion"]["version"] == "1"  # the champion did not move
    assert reload("base", "general").json()["version"] == "base"  # rolled back
    assert _ask(url, "hi", model="general").headers["x-model-version"] == "base"
    failed = reload("models:/flywheel-llm-tiny/99", "general")
    assert failed.status_code == 422 and failed.json()["error"]["param"] == "model_uri"
    assert _ask(url, "hi", model="general").headers["x-model-version"] == "base"

    champion = httpx.delete(f"{url}/admin/models/champion", headers=admin)
    assert champion.status_code == 400
    assert httpx.delete(f"{url}/admin/models/general").status_code == 401
    assert httpx.delete(f"{url}/admin/models/general", headers=admin).status_code == 200
    assert "general" not in _listed(url)
    assert (
        httpx.post(f"{url}/generate", json={"prompt": "hi", "model": "general"}).status_code == 404
    )
    assert httpx.delete(f"{url}/admin/models/general", headers=admin).status_code == 404
    # With no general model, the router's off-topic questions go to the champion.
    away = _ask(url, OFF_TOPIC)
    assert (away.headers["x-flywheel-route"], away.headers["x-flywheel-model"]) == (
        "general",
        "champion",
    )
    assert reload("base", "general").status_code == 200  # back for whatever runs next


@pytest.fixture
def own_registry(champion_home, tmp_path, monkeypatch):
    """A copy of the champion's home, whose registry a test may change."""
    import shutil

    home = tmp_path / "home"
    shutil.copytree(champion_home, home, ignore=shutil.ignore_patterns("service.log", "bentoml"))
    monkeypatch.setenv("FLYWHEEL_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri(home))
    monkeypatch.setenv("FLYWHEEL_PROFILE", "tiny")
    return home


def new_version(source: str | None = None) -> str:
    """Register another version: version 1's weights, or what `source` holds."""
    from components.registry.tracking import mlflow_client

    client = mlflow_client()
    first = client.get_model_version("flywheel-llm-tiny", "1")
    version = client.create_model_version("flywheel-llm-tiny", source or first.source, first.run_id)
    return str(version.version)


def test_a_replica_follows_the_alias_and_refuses_a_version_that_fails(
    own_registry, tmp_path
) -> None:
    from components.config import load_profile
    from components.registry.aliases import CHAMPION, point
    from components.registry.tracking import mlflow_client
    from components.serving.fleet import ModelSet
    from components.serving.protocol import GenerationInput

    models = ModelSet(load_profile("tiny"), warmup=False)
    models.load("champion", "@champion")
    assert models.catch_up() == {}  # the alias has not moved

    def answered_by() -> str:
        [out] = models.generate([GenerationInput(text="hi", max_new_tokens=2)])
        assert out.error is None, out.error
        return out.model_version

    second = new_version()
    point("flywheel-llm-tiny", CHAMPION, second)
    assert models.catch_up() == {"champion": f"serves v{second}"}
    assert answered_by() == second

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "MLmodel").write_text("not a model\n")
    third = new_version(str(broken))
    point("flywheel-llm-tiny", CHAMPION, third)
    outcome = models.catch_up()["champion"]
    assert outcome.startswith(f"refused v{third}"), outcome
    assert answered_by() == second  # the previous version stays
    [row] = models.listing()
    assert row["ready"] and row["refused"]["version"] == third
    tags = mlflow_client().get_model_version("flywheel-llm-tiny", third).tags
    assert tags["serve.refused"] == row["refused"]["reason"]
    assert models.catch_up() == {}  # not tried again while the alias stays there

    point("flywheel-llm-tiny", CHAMPION, "1")  # rolled back, by a person in the MLflow UI
    assert models.catch_up() == {"champion": "serves v1"}
    assert answered_by() == "1" and "refused" not in models.listing()[0]


@pytest.mark.e2e
def test_a_running_service_serves_the_version_the_alias_moves_to(own_registry) -> None:
    from components.registry.aliases import CHAMPION, point

    service = ServedService(own_registry, env={"FLYWHEEL_SET": "serve.follow_s=1"})
    try:
        service.wait_ready()

        def version() -> str:
            body = {"prompt": "hi", "max_new_tokens": 2}
            answer = httpx.post(f"{service.url}/generate", json=body, timeout=60)
            assert answer.status_code == 200, answer.text
            return answer.headers["x-model-version"]

        assert version() == "1"
        second = new_version()
        point("flywheel-llm-tiny", CHAMPION, second)  # nobody calls the service
        moved = time.monotonic()
        while version() != second:
            assert time.monotonic() - moved < 60, service.log_path.read_text()[-3000:]
            time.sleep(0.5)
        listed = httpx.get(f"{service.url}/v1/models", timeout=30).json()["data"]
        assert next(m for m in listed if m["id"] == "champion")["version"] == second
    finally:
        service.stop()
