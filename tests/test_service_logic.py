"""Service logic in-process: batching rules, the inference store, and the gateway's routes
with the generator called directly instead of over HTTP."""

import json
from pathlib import Path

import pytest

from components.inference.records import InferenceRecord, UnknownRequest
from components.inference.store import InferenceStore
from components.model.generation import GenerationRequest, generate_requests, group_requests
from service.generator_client import ERROR_STATUS


def req(max_new_tokens: int, temperature: float = 0.0, stop: tuple = ()) -> GenerationRequest:
    return GenerationRequest(
        prompt="<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        stop=stop,
    )


def test_short_requests_are_not_grouped_with_long_ones() -> None:
    groups = group_requests([req(16), req(256), req(24), req(16, temperature=0.7), req(200)])
    assert sorted(sorted(g) for g in groups) == [[0, 2], [1, 4], [3]]


def test_each_request_keeps_its_own_token_limit(tiny_base) -> None:
    from components.model.generation import load_for_inference

    model, tokenizer = load_for_inference(tiny_base.path)
    results = generate_requests(model, tokenizer, [req(3), req(5), req(8)])
    assert [r.completion_tokens for r in results] == [3, 5, 8]
    assert all(r.confidence is not None and 0 < r.confidence <= 1 for r in results)


def test_confidence_is_the_models_own_token_probability(tiny_base) -> None:
    import math

    import torch

    from components.model.generation import load_for_inference

    model, tokenizer = load_for_inference(tiny_base.path)
    request = req(6)
    result = generate_requests(model, tokenizer, [request])[0]
    prompt = tokenizer(request.prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(
        **prompt,
        max_new_tokens=6,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    scores = model.compute_transition_scores(output.sequences, output.scores, normalize_logits=True)
    expected = math.exp(float(torch.mean(scores[0, : result.completion_tokens])))
    assert result.confidence == pytest.approx(expected, abs=1e-3)


def test_stop_strings_end_only_their_own_row(tokenizer) -> None:
    import torch

    from components.model.generation import _row_limits, truncate_at_stop

    prompt = tokenizer("Q:", add_special_tokens=False)["input_ids"]
    answer = tokenizer(" run make test then stop", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + answer, prompt + answer])
    rows = [req(50, stop=("make test",)), req(50, stop=("never",))]
    done = _row_limits(tokenizer, rows, len(prompt))(ids, None)
    assert done.tolist() == [True, False]
    assert truncate_at_stop("run make test then", ["make test"]) == "run "


def _record(request_id: str, prompt: str = "hi") -> InferenceRecord:
    return InferenceRecord(request_id, 1.0, "1", "generate", prompt, "answer", 3, 4, 12.5)


def test_store_logs_off_the_request_path_and_keeps_feedback_idempotent(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    store = InferenceStore(url)
    for i in range(50):
        store.log(_record(f"r{i}"))
    record, created = store.add_feedback("r7", "down", correction="better")
    assert created and record.rating == "down"
    assert store.add_feedback("r7", "down", correction="better")[1] is False
    assert store.add_feedback("r7", "up")[1] is True  # a changed mind replaces the rating
    with pytest.raises(UnknownRequest):
        store.add_feedback("never-logged", "up")
    store.log(_record("last"))
    store.close()  # a clean shutdown writes what is still queued

    reopened = InferenceStore(url)
    try:
        assert len(reopened.inferences_since(0)) == 51
        assert reopened.rating_counts() == {"up": 1}
        with reopened.engine.connect() as conn:
            mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
        assert mode == "wal"
    finally:
        reopened.close()


def test_the_same_rating_sent_at_once_is_one_row_and_no_error(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    store = InferenceStore(f"sqlite:///{tmp_path / 'feedback.db'}")
    try:
        store.log(_record("r1"))
        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(lambda _: store.add_feedback("r1", "down", "fix"), range(20)))
        assert sum(created for _, created in results) == 1
        assert store.rating_counts() == {"down": 1}
    finally:
        store.close()


def test_answers_join_feedback_by_answer_time_or_rating_time(tmp_path: Path) -> None:
    store = InferenceStore(f"sqlite:///{tmp_path / 'feedback.db'}")
    try:
        for i in range(4):
            store.log(InferenceRecord(f"r{i}", 10.0 + i, "1", "generate", "q", "a", 1, 1, 1.0, 0.5))
        store.add_feedback("r1", "down", correction="fixed")
        everything = store.answers_since(0)
        assert [a.rating for a in everything] == [None, "down", None, None]
        assert everything[1].correction == "fixed" and everything[1].confidence == 0.5
        assert store.answers_since(11.5, until=13.0)[0].request_id == "r2"
        rated = store.answers_since(0, rated=True)
        assert [a.request_id for a in rated] == ["r1"]
        assert store.answers_since(rated[0].rated_at + 1, rated=True) == []
    finally:
        store.close()


def test_a_store_from_before_confidence_is_upgraded(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE inference (request_id VARCHAR(64) PRIMARY KEY, created_at FLOAT,"
            " model_version VARCHAR(128), endpoint VARCHAR(64), prompt TEXT, response TEXT,"
            " prompt_tokens INTEGER, completion_tokens INTEGER, latency_ms FLOAT)"
        )
        conn.execute("INSERT INTO inference VALUES ('old', 1, '1', 'generate', 'q', 'a', 1, 1, 1)")
    store = InferenceStore(f"sqlite:///{path}")
    try:
        store.log(_record("new"))
        assert [a.confidence for a in store.answers_since(0)] == [None, None]
        assert store.get("old") is not None
    finally:
        store.close()


def _hold_write_lock(path: Path, seconds: float):
    """Another process's view: an exclusive SQLite transaction held for `seconds`."""
    import sqlite3
    import threading

    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(seconds, lambda: (connection.execute("COMMIT"), connection.close()))
    release.start()
    return release


def test_a_locked_database_loses_no_generation(home: Path) -> None:
    path = home / "feedback.db"
    store = InferenceStore(f"sqlite:///{path}")
    store.log(_record("before"))
    assert store.flush(10)
    release = _hold_write_lock(path, 5.0)
    for i in range(20):
        store.log(_record(f"during-{i}"))
    assert not store.flush(3.5)  # still locked: kept in the spool, not dropped
    assert list((home / "spool").glob("inference-*.jsonl"))
    release.join()
    assert store.flush(20)
    record, created = store.add_feedback("during-7", "down", correction="fixed")
    assert created and record.correction == "fixed"
    assert {r.request_id for r in store.inferences_since(0)} == {"before"} | {
        f"during-{i}" for i in range(20)
    }
    store.close()
    assert not list((home / "spool").glob("*.jsonl"))


def test_rows_a_closing_store_could_not_write_are_written_by_the_next(home: Path) -> None:
    path = home / "feedback.db"
    InferenceStore(f"sqlite:///{path}").close()  # create the tables
    release = _hold_write_lock(path, 6.0)
    store = InferenceStore(f"sqlite:///{path}")
    store.log(_record("late"))
    store.close()  # the database is still locked: the row stays in the spool
    spooled = list((home / "spool").glob("inference-*.jsonl"))
    assert spooled and "late" in spooled[0].read_text()
    release.join()
    reopened = InferenceStore(f"sqlite:///{path}")  # adopts the spool of the closed store
    assert reopened.flush(20)
    assert reopened.get("late") is not None
    reopened.close()
    assert not list((home / "spool").glob("*.jsonl"))


def test_a_failing_stream_raises_instead_of_hanging(tiny_base) -> None:
    from components.model.generation import load_for_inference, stream_request

    model, tokenizer = load_for_inference(tiny_base.path)

    def broken(**kwargs):
        raise RuntimeError("probabilities contain nan")

    model.generate = broken
    with pytest.raises(RuntimeError, match="nan"):
        list(stream_request(model, tokenizer, req(8)))


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-8])
def test_a_vanishing_temperature_decodes_greedily(tiny_base, temperature) -> None:
    from components.model.generation import load_for_inference, stream_request

    model, tokenizer = load_for_inference(tiny_base.path)
    greedy = generate_requests(model, tokenizer, [req(6)])[0]
    tiny = generate_requests(model, tokenizer, [req(6, temperature=temperature)])[0]
    assert tiny.text == greedy.text and tiny.completion_tokens == 6
    streamed = "".join(stream_request(model, tokenizer, req(6, temperature=temperature)))
    assert streamed.strip() == greedy.text


def test_one_request_that_breaks_generation_fails_alone(champion_home, monkeypatch) -> None:
    from components.serving.loading import default_model_uri
    from components.serving.model import ServedModel
    from components.serving.protocol import GenerationInput

    monkeypatch.setenv("FLYWHEEL_HOME", str(champion_home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{champion_home / 'mlflow.db'}")
    monkeypatch.setenv("FLYWHEEL_PROFILE", "tiny")
    served = ServedModel.from_uri(default_model_uri(), warmup=False)
    engine = served.loaded.engine
    real = engine.generate

    def fragile(requests):
        if any("boom" in r.prompt for r in requests):
            raise RuntimeError("this input breaks the model")
        return real(requests)

    monkeypatch.setattr(engine, "generate", fragile)
    inputs = [
        GenerationInput(messages=[{"role": "user", "content": text}], max_new_tokens=3)
        for text in ("fine", "boom", "also fine")
    ]
    outputs = served.generate(inputs)
    assert [o.error_code for o in outputs] == [None, "generation_failed", None]
    assert outputs[0].completion_tokens == 3 and outputs[2].completion_tokens == 3


def test_a_missing_champion_is_one_clear_error_and_not_ready(home, monkeypatch) -> None:
    import time

    from components.config import load_profile
    from components.serving.fleet import ModelSet
    from components.serving.protocol import GenerationInput

    models = ModelSet.load_in_background(load_profile("tiny"))
    champion = models.slots["champion"]
    deadline = time.monotonic() + 30
    while champion.error is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not models.ready
    assert champion.error == (
        f"no champion for flywheel-llm-tiny in sqlite:///{home / 'mlflow.db'}: run make train first"
    )
    assert models.listing() == [{"name": "champion", "ready": False, "error": champion.error}]
    item = GenerationInput(text="hi", max_new_tokens=2)
    [output] = models.generate([item])
    assert output.error_code == "model_not_ready" and ERROR_STATUS[output.error_code] == 503
    assert next(models.stream(item)).error_code == "model_not_ready"


class LocalGenerator:
    """The generator service's methods over a `ModelSet`, called in-process."""

    def __init__(self, models) -> None:
        self.fleet = models
        self.to_async = self

    async def generate(self, inputs):
        return self.fleet.generate(inputs)

    async def stream(self, item):
        for output in self.fleet.stream(item):
            yield output.model_dump_json() + "\n"

    async def count_tokens(self, item, answer):
        return self.fleet.count_tokens(item, answer)

    async def models(self):
        return self.fleet.listing()

    async def reload(self, model_uri, model="champion"):
        loaded = self.fleet.load(model, model_uri)
        return {"model": model, "name": loaded.name, "version": loaded.version}

    async def unload(self, model):
        self.fleet.unload(model)
        return {"model": model, "unloaded": True}


@pytest.fixture
def client_for(champion_home, monkeypatch):
    """A TestClient of the real FastAPI routes, the gateway built with the given env."""
    from bentoml import get_current_service
    from fastapi.testclient import TestClient

    monkeypatch.setenv("FLYWHEEL_HOME", str(champion_home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{champion_home / 'mlflow.db'}")
    monkeypatch.setenv("FLYWHEEL_PROFILE", "tiny")
    from components.config import MemoryConfig, RetrievalConfig
    from components.retrieval.index import build_index
    from components.serving.fleet import ModelSet
    from components.serving.loading import default_model_uri, serve_settings, serving_profile
    from service.routes import Gateway
    from service.service import app

    served = ModelSet(serving_profile(), warmup=False)
    served.load("champion", default_model_uri())
    gateways = []

    def make(
        settings_update: dict | None = None,
        api_key: str | None = None,
        memory: dict | None = None,
        retrieval: dict | None = None,
    ) -> TestClient:
        if api_key:
            monkeypatch.setenv("FLYWHEEL_API_KEY", api_key)
        settings = serve_settings().model_copy(update=settings_update or {})
        memory_config = MemoryConfig(**(memory or {}))
        docs_config = RetrievalConfig(**(retrieval or {}))
        docs = build_index(docs_config, [], 10) if docs_config.enabled else None
        gateway = Gateway(
            settings,
            LocalGenerator(served),
            "flywheel-llm-tiny",
            memory_config,
            docs,
        )
        gateways.append(gateway)
        app.dependency_overrides[get_current_service] = lambda: type(
            "Svc", (), {"gateway": gateway}
        )()
        client = TestClient(app)
        client.gateway = gateway  # type: ignore[attr-defined]
        return client

    yield make
    app.dependency_overrides.clear()
    for gateway in gateways:
        gateway.close()


def test_api_key_protects_generation_and_feedback(client_for) -> None:
    client = client_for(api_key="s3cret")
    body = {"prompt": "hi", "max_new_tokens": 2}
    denied = client.post("/generate", json=body)
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    assert (
        client.post("/generate", json=body, headers={"authorization": "Bearer wrong"}).status_code
        == 401
    )
    ok = client.post("/generate", json=body, headers={"authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert (
        client.post(
            "/feedback", json={"request_id": ok.json()["request_id"], "rating": "up"}
        ).status_code
        == 401
    )


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("full", "mail me at ann@example.com"), ("redacted", "mail me at [EMAIL]"), ("off", "")],
)
def test_prompt_logging_modes(client_for, mode, expected) -> None:
    client = client_for({"log_prompts": mode})
    response = client.post(
        "/generate", json={"prompt": "mail me at ann@example.com", "max_new_tokens": 2}
    )
    assert response.status_code == 200
    # The gateway's own store: get() waits for its background writer.
    logged = client.gateway.store.get(response.json()["request_id"])
    assert logged is not None and logged.prompt == expected


def test_streaming_route_in_process(client_for) -> None:
    client = client_for()
    response = client.post(
        "/v1/completions", json={"prompt": "Flywheel", "max_tokens": 3, "stream": True}
    )
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    # The tiny random model never says end-of-turn within 3 tokens: it stops at the limit.
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks)  # only when asked for


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"prompt": "Flywheel"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Flywheel"}]}),
    ],
)
def test_a_stream_ends_with_its_usage_when_asked(client_for, path, body) -> None:
    client = client_for()
    options = {"stream": True, "max_tokens": 3, "stream_options": {"include_usage": True}}
    response = client.post(path, json={**body, **options})
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    *answer, usage = [json.loads(e) for e in events[:-1]]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    assert usage["usage"]["prompt_tokens"] > 0
    assert usage["usage"]["total_tokens"] == 3 + usage["usage"]["prompt_tokens"]
    assert answer[-1]["choices"][0]["finish_reason"] == "length"


class UnreachableGenerator:
    """A generator whose server is gone: every call fails to connect, as during a shutdown."""

    def __init__(self) -> None:
        self.to_async = self
        self.calls = 0

    def _fail(self):
        import aiohttp

        self.calls += 1
        raise aiohttp.ServerDisconnectedError()

    async def generate(self, inputs):
        self._fail()

    async def stream(self, item):
        self._fail()
        yield ""  # an async generator, like the real one

    async def count_tokens(self, item, answer):
        self._fail()


class BreakingGenerator(LocalGenerator):
    """A generator whose stream breaks after two pieces: by an error output (the engine
    stopped) or by going away (its process was killed)."""

    def __init__(self, models, how: str) -> None:
        super().__init__(models)
        self.how = how

    async def stream(self, item):
        import aiohttp

        from components.serving.protocol import failed

        pieces = 0
        async for line in super().stream(item):
            if pieces == 2:
                if self.how == "process gone":
                    raise aiohttp.ServerDisconnectedError()
                yield (
                    failed("the engine's scheduler stopped", "generation_failed").model_dump_json()
                    + "\n"
                )
                return
            pieces += 1
            yield line


@pytest.mark.parametrize("how", ["error output", "process gone"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_stream_that_fails_midway_ends_with_an_error_event_and_is_logged_failed(
    client_for, how, path
) -> None:
    client = client_for()
    local = client.gateway.generator.generator
    client.gateway.generator.generator = BreakingGenerator(local.fleet, how)
    ask = {"messages": [{"role": "user", "content": "hi"}]}
    if path == "/v1/completions":
        ask = {"prompt": "hi"}
    response = client.post(path, json={**ask, "max_tokens": 12, "stream": True})
    assert response.status_code == 200  # the first piece was sent before it broke
    events = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e]
    *pieces, last = [json.loads(e) for e in events]  # no [DONE]: the answer is not complete
    assert set(last) == {"error"} and last["error"]["type"] == "server_error"
    assert (
        last["error"]["code"] in ("generation_failed", "unavailable") and last["error"]["message"]
    )
    assert len(pieces) == 2
    assert all(p["choices"][0]["finish_reason"] is None for p in pieces)  # never "stop"
    logged = client.gateway.store.get(response.headers["x-request-id"])
    assert logged is not None and logged.error, logged


@pytest.mark.parametrize(
    "path, body",
    [
        ("/generate", {"prompt": "hi", "max_new_tokens": 2}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream": True}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "stream": True},
        ),
    ],
)
def test_an_unreachable_generator_is_a_503_to_retry_on_every_route(client_for, path, body) -> None:
    client = client_for()
    client.gateway.generator.generator = UnreachableGenerator()
    response = client.post(path, json=body)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "unavailable"
    assert client.gateway.generator.generator.calls >= 1


FACT = {
    "q": "How long does the prod cluster keep inference logs?",
    "p": "On prod, for how many days are the inference logs retained?",
    "a": "The prod cluster keeps inference logs for 45 days.",
}
UNRELATED = "How do I bake a loaf of sourdough bread?"


def ask(client, prompt: str, memory: str | None = None):
    headers = {"x-flywheel-memory": memory} if memory else {}
    response = client.post(
        "/generate", json={"prompt": prompt, "max_new_tokens": 6}, headers=headers
    )
    assert response.status_code == 200, response.text
    return response.headers["x-flywheel-memory"], response.json()


def correct(client, prompt: str, correction: str) -> dict:
    _, answer = ask(client, prompt)
    body = {"request_id": answer["request_id"], "rating": "down", "correction": correction}
    response = client.post("/feedback", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_trusted_correction_answers_the_same_and_a_rephrased_question(client_for) -> None:
    client = client_for(memory={"trust": "feedback"})
    assert ask(client, FACT["q"])[0] == "miss"
    stored = correct(client, FACT["q"], FACT["a"])
    assert stored["memory"].startswith("kept as mem-")
    entry_id = stored["memory"].removeprefix("kept as ")

    for question in (FACT["q"], FACT["p"]):
        status, answer = ask(client, question)
        assert (status, answer["text"]) == ("hit", FACT["a"])
        assert answer["completion_tokens"] > 0 and answer["model_version"] == "1"
        logged = client.gateway.store.get(answer["request_id"])
        assert logged.memory_entry == entry_id  # the hit is in the inference log
    assert ask(client, UNRELATED)[0] == "miss"
    status, own = ask(client, FACT["q"], memory="off")  # what the weights alone say
    assert status == "off" and own["text"] != FACT["a"]
    assert client.gateway.store.get(own["request_id"]).memory_entry is None

    chat = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": FACT["p"]}], "max_tokens": 4},
    )
    assert chat.headers["x-flywheel-memory"] == "hit"
    assert chat.json()["choices"][0]["message"]["content"] == FACT["a"]
    assert chat.json()["choices"][0]["finish_reason"] == "stop"
    streamed = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": FACT["q"]}], "stream": True},
    )
    assert streamed.headers["x-flywheel-memory"] == "hit"
    events = [json.loads(e.removeprefix("data: ")) for e in streamed.text.split("\n\n")[:-2] if e]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == FACT["a"]


def test_the_admin_lists_and_deletes_entries(client_for) -> None:
    from components.serving.auth import admin_key

    client = client_for(memory={"trust": "feedback"})
    admin = {"authorization": f"Bearer {admin_key()}"}
    before = client.get("/admin/memory", headers=admin).json()["policy"]
    correct(client, FACT["q"], FACT["a"])
    assert client.get("/admin/memory").status_code == 401
    listed = client.get("/admin/memory", headers=admin).json()
    # How the one trust policy judged every correction sent, by rule
    admitted = listed["policy"]["admitted"].get("agreement", 0)
    assert admitted == before["admitted"].get("agreement", 0) + 1
    assert listed["policy"]["refused"] == before["refused"]
    entries = [e for e in listed["entries"] if e["answer"] == FACT["a"]]
    assert entries and all(e["source"] == "feedback" and e["model_version"] == "1" for e in entries)
    assert all(e["request_id"].startswith("gen-") and e["accepted_at"] > 0 for e in entries)
    assert [e["served"] for e in entries].count(True) == 1  # one per question and correction
    for entry in entries:  # (earlier tests in this module taught the same fact)
        assert client.delete(f"/admin/memory/{entry['id']}", headers=admin).status_code == 200
    assert client.delete("/admin/memory/mem-nope", headers=admin).status_code == 404
    assert ask(client, FACT["q"])[0] == "miss"


def test_a_chat_without_a_user_turn_is_answered_by_the_model(client_for) -> None:
    client = client_for(memory={"trust": "feedback"})
    body = {"messages": [{"role": "system", "content": "Be brief."}], "max_tokens": 2}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["x-flywheel-memory"] == "miss"
    assert response.json()["usage"]["completion_tokens"] == 2


def test_a_forged_bearer_is_not_another_client(client_for, monkeypatch) -> None:
    """Without keys, a client is its address: corrections sent under made-up bearers are one
    client's, so they neither agree with each other nor escape the hourly limit."""
    monkeypatch.delenv("FLYWHEEL_API_KEY", raising=False)
    client = client_for(memory={"trust": "feedback", "min_agreement": 2})
    for token in ("made-up-1", "made-up-2"):
        client.headers["authorization"] = f"Bearer {token}"
        assert correct(client, FACT["q"], FACT["a"])["memory"].startswith("kept as mem-")
    assert ask(client, FACT["q"])[0] == "miss"  # two bearers, one client: no agreement
    feedback = client.gateway.store.feedback_since(0)
    assert len({f.client for f in feedback}) == 1 and feedback[0].client.startswith("address:")


def test_a_reviewed_only_memory_ignores_user_corrections(client_for) -> None:
    client = client_for()  # the default policy: trust reviewed corrections only
    stored = correct(client, FACT["q"], FACT["a"])
    assert stored["memory"].startswith("not kept: the memory trusts reviewed corrections")
    assert ask(client, FACT["q"])[0] == "miss"


@pytest.mark.parametrize(
    ("answer", "stated"),
    [
        ("The prod cluster keeps inference logs for 45 days.", True),
        ("Prod keeps its inference logs 45 days, then deletes them.", True),
        ("The prod cluster keeps inference logs for 30 days.", False),  # another value
        ("Inference logs are kept for a while.", False),
    ],
)
def test_an_entry_retires_only_when_the_answer_states_its_fact(answer, stated) -> None:
    from components.memory.retire import fact_words, states_fact

    assert fact_words(FACT["q"], FACT["a"]) == {"keeps", "45", "days"}
    assert states_fact(FACT["q"], FACT["a"], answer) is stated


def test_entries_the_new_weights_state_retire_and_the_rest_stay_served(home) -> None:
    """The weights' answers (memory off) stand in for a trained model: the random tiny one
    states nothing. The deploy flow runs this against the real service (test_deploy)."""
    import httpx

    from components.config import MemoryConfig
    from components.memory.retire import retire_learned
    from components.memory.store import CorrectionMemory

    config = MemoryConfig()
    memory = CorrectionMemory(config)
    learned = memory.remember(FACT["q"], FACT["a"], "label-studio", "r1", "1")
    unknown = memory.remember(
        "Who approves a champion?", "Lena Fischer does.", "label-studio", "r2", "1"
    )
    weights = {
        FACT["q"]: "Prod keeps its inference logs for 45 days.",
        unknown.question: "Ask ops.",
    }
    asked = []

    def service(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers["x-flywheel-memory"])
        prompt = json.loads(request.content)["prompt"]
        return httpx.Response(200, json={"text": weights[prompt]}, headers={"x-model-version": "2"})

    with httpx.Client(transport=httpx.MockTransport(service), base_url="http://svc") as client:
        outcome = retire_learned(config, client, "2")
        assert (outcome.retired, outcome.kept, asked) == ([learned.id], [unknown.id], ["off"] * 2)
        assert [e.id for e in memory.served()] == [unknown.id]
        assert memory.recall(FACT["p"]) is None  # the weights answer it now
        # Answers from another version (a swap in between) judge nothing.
        assert retire_learned(config, client, "3").errors == [f"{unknown.id}: answered by v2"]
    assert {e.id: e.status for e in memory.entries()} == {
        learned.id: "retired",
        unknown.id: "active",
    }
    memory.close()


def test_memory_policy_limits_what_one_client_can_teach(home) -> None:
    from components.config import MemoryConfig
    from components.memory.store import CorrectionMemory, CorrectionRejected

    config = MemoryConfig(
        trust="feedback",
        min_agreement=2,
        corrections_per_client_per_hour=2,
        max_correction_chars=80,
    )
    memory = CorrectionMemory(config)
    memory.remember(FACT["q"], FACT["a"] + " Mail ops@example.com.", "feedback", "r1", "1", "alice")
    assert memory.recall(FACT["p"]) is None  # one client is not agreement
    memory.remember(FACT["q"], FACT["a"] + " Mail ops@example.com.", "feedback", "r2", "1", "bob")
    recall = memory.recall(FACT["p"])
    assert recall is not None and recall.score >= config.threshold
    assert recall.entry.answer.endswith("Mail [EMAIL].")  # scrubbed before it is stored
    with pytest.raises(CorrectionRejected, match="at most 80"):
        memory.remember(FACT["q"], "x" * 81, "feedback", "r3", "1", "carol")
    memory.remember("Which port?", "Port 3000.", "feedback", "r4", "1", "alice")
    with pytest.raises(CorrectionRejected, match="in the last hour"):
        memory.remember("Which host?", "Host a.", "feedback", "r5", "1", "alice")
    memory.close()

    reopened = CorrectionMemory(config)  # entries survive a restart
    assert reopened.recall(FACT["q"]).entry.answer == recall.entry.answer
    assert reopened.recall(UNRELATED) is None
    reviewed_only = CorrectionMemory(MemoryConfig())
    assert reviewed_only.recall(FACT["q"]) is None
    reviewed_only.remember(FACT["q"], "Reviewed: 45 days.", "label-studio", "r6", "1")
    assert reviewed_only.recall(FACT["p"]).entry.answer == "Reviewed: 45 days."
    reopened.close()
    reviewed_only.close()


def test_grounded_answers_name_their_sources_on_every_chat_route(client_for, tmp_path) -> None:
    """With retrieval on, /generate and chat (whole, streamed, and through the openai client)
    give the model the passages and say which; `x-flywheel-retrieval: off` asks without them,
    and raw text completions are never grounded."""
    from openai import OpenAI

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "ops.md").write_text(
        "# Operations\n\n## Staging\n\nThe staging MLflow server listens on port 5077.\n\n"
        "## Paging\n\nPriya Raman holds the pager for the serving cluster.\n"
    )
    client = client_for(retrieval={"enabled": True, "corpus": [str(docs)], "top_k": 1})
    question = "Which port does the staging MLflow server listen on?"
    body = {"prompt": question, "max_new_tokens": 3}

    grounded = client.post("/generate", json=body)
    plain = client.post("/generate", json=body, headers={"x-flywheel-retrieval": "off"})
    assert grounded.status_code == plain.status_code == 200, grounded.text
    assert grounded.headers["x-flywheel-retrieval"] == "on"
    assert plain.headers["x-flywheel-retrieval"] == "off" and "sources" not in plain.json()
    [source] = grounded.json()["sources"]
    assert source["title"] == "Operations > Staging" and source["source"].endswith("ops.md")
    # the passage went into the prompt: many more prompt tokens than the question alone
    assert grounded.json()["prompt_tokens"] > plain.json()["prompt_tokens"] + 10

    chat = {"messages": [{"role": "user", "content": question}], "max_tokens": 3}
    whole = client.post("/v1/chat/completions", json=chat)
    assert whole.json()["sources"] == [source]
    with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as stream:
        events = [line for line in stream.iter_lines() if line.startswith("data: {")]
    assert json.loads(events[0].removeprefix("data: "))["sources"] == [source]
    assert all("sources" not in json.loads(e.removeprefix("data: ")) for e in events[1:])

    raw = client.post("/v1/completions", json={"prompt": question, "max_tokens": 3})
    assert raw.headers["x-flywheel-retrieval"] == "off" and "sources" not in raw.json()

    openai = OpenAI(base_url=f"{client.base_url}/v1", api_key="unused", http_client=client)
    reply = openai.chat.completions.create(model="flywheel-llm-tiny", **chat)
    assert reply.choices[0].message.content is not None
    assert reply.model_extra and reply.model_extra["sources"] == [source]


def test_the_router_sends_off_topic_questions_the_scope_reply(client_for) -> None:
    """With routing on, the champion answers questions of its domain (what it was trained on)
    and off-topic ones get the profile's scope reply, whole and streamed; every answer says
    where it went, and the inference log keeps the route and its similarity."""
    import time

    from components.config import RoutingConfig

    routing = RoutingConfig(enabled=True, scope_reply="Only Flywheel questions, please.")
    client = client_for(settings_update={"routing": routing})
    gateway = client.gateway
    assert client.post("/generate", json={"prompt": "hi", "max_new_tokens": 1}).status_code == 200
    deadline = time.monotonic() + 120  # the served version is known now: its domain is fitted
    while gateway.router.judge("hello") is None and time.monotonic() < deadline:
        time.sleep(0.5)

    on_topic = client.post(
        "/generate", json={"prompt": "How do I start a training run?", "max_new_tokens": 4}
    )
    off_topic = client.post(
        "/generate", json={"prompt": "What's the secret to a good pad thai?", "max_new_tokens": 4}
    )
    assert on_topic.headers["x-flywheel-route"] == "champion"
    assert on_topic.json()["text"] != routing.scope_reply
    assert off_topic.headers["x-flywheel-route"] == "scope"
    assert off_topic.json()["text"] == routing.scope_reply
    assert off_topic.json()["completion_tokens"] > 0  # counted by the served tokenizer

    chat = {"messages": [{"role": "user", "content": "Best banana bread recipe?"}], "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=chat) as stream:
        assert stream.headers["x-flywheel-route"] == "scope"
        pieces = [
            json.loads(line.removeprefix("data: "))
            for line in stream.iter_lines()
            if line.startswith("data: {")
        ]
    text = "".join(p["choices"][0]["delta"].get("content") or "" for p in pieces if p["choices"])
    assert text == routing.scope_reply
    assert [p["choices"][0]["finish_reason"] for p in pieces if p["choices"]][-1] == "stop"

    gateway.store.flush()
    logged = {a.request_id: a for a in gateway.store.answers_since(0)}
    route = logged[off_topic.json()["request_id"]]
    assert route.route == "scope" and route.route_similarity < routing.min_similarity
    kept = logged[on_topic.json()["request_id"]]
    assert kept.route == "champion" and kept.route_similarity >= routing.min_similarity


def test_readiness_is_503_from_the_moment_a_drain_begins(monkeypatch) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from service.edge import Draining, ServiceEdge

    inner = FastAPI()
    inner.get("/readyz")(lambda: {"ready": True})
    inner.get("/healthz")(lambda: {"alive": True})
    client = TestClient(ServiceEdge(inner, max_concurrency=4))
    assert client.get("/readyz").status_code == 200
    assert client.get("/health").json() == {"alive": True}  # the other servers' name
    monkeypatch.setattr(Draining, "active", True)
    draining = client.get("/readyz")
    assert draining.status_code == 503 and draining.json()["error"]["code"] == "draining"
    assert client.get("/healthz").status_code == 200  # alive while it drains
