"""The service over HTTP: a real `bentoml serve` of a registered tiny champion."""

import concurrent.futures
import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples (matching the labels) scraped from /metrics."""
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_openai_client_works_unchanged(served) -> None:
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=f"{served.url}/v1", api_key="unused")
    # The registered name (the router chooses), then each served model by its name.
    assert [m.id for m in client.models.list()] == ["flywheel-llm-tiny", "champion"]

    chat = client.chat.completions.create(
        model="flywheel-llm-tiny",
        messages=[{"role": "user", "content": "How do I test?"}],
        max_tokens=5,
    )
    assert chat.id.startswith("chatcmpl-")
    assert chat.usage.completion_tokens == 5 and chat.choices[0].finish_reason == "length"

    pieces = list(
        client.chat.completions.create(
            model="flywheel-llm-tiny",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=5,
            stream=True,
        )
    )
    text = "".join(p.choices[0].delta.content or "" for p in pieces)
    # The tiny random model does not end its turn within 5 tokens: the limit ends the stream.
    assert text and pieces[-1].choices[0].finish_reason == "length"
    assert [p.choices[0].finish_reason for p in pieces[:-1]] == [None] * (len(pieces) - 1)
    assert pieces[0].choices[0].delta.role == "assistant"

    completion = client.completions.create(
        model="flywheel-llm-tiny", prompt="Flywheel is", max_tokens=4
    )
    assert completion.usage.completion_tokens == 4
    streamed = list(
        client.completions.create(
            model="flywheel-llm-tiny", prompt="Flywheel is", max_tokens=4, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in streamed)

    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}])
    retrieved = client.models.retrieve("flywheel-llm-tiny")
    assert retrieved.id == "flywheel-llm-tiny" and retrieved.owned_by == "flywheel"
    with pytest.raises(NotFoundError):
        client.models.retrieve("gpt-4")


def test_stream_ends_with_done(served) -> None:
    with httpx.stream(
        "POST",
        f"{served.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True},
        timeout=60,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_the_load_benchmark_measures_whole_answers_streams_and_cache_hits(served) -> None:
    """The benchmark's clients against the real service: tokens from the usage chunk, time
    to first token for streams, and the cache's hit rate from /metrics."""
    from benchmarks.serve_load import generate_call, openai_call, served_load

    prompts = ["Flywheel", "Flywheel is"]  # the tiny model answers chats with special tokens only
    whole = served_load(served.url, generate_call(served.url, 8), prompts, 2, 3.0)
    assert whole["requests"] > 2 and whole["errors"] == 0
    assert whole["tokens_per_s"] > 0 and whole["cache_hit_rate"] > 0  # the prompts repeat
    streams = served_load(
        served.url, openai_call(served.url, 8, stream=True, chat=False), prompts, 2, 3.0
    )
    assert streams["requests"] > 0 and streams["errors"] == 0
    assert streams["tokens_per_s"] > 0 and 0 < streams["ttft_p50_s"] <= streams["p50_s"]


def test_concurrent_requests_are_batched(served) -> None:
    before_sum = metric(served.url, "bentoml_service_adaptive_batch_size_sum")
    before_count = metric(served.url, "bentoml_service_adaptive_batch_size_count")

    def call(i: int) -> dict:
        response = httpx.post(
            f"{served.url}/generate",
            timeout=120,
            json={"prompt": f"Question number {i}?", "max_new_tokens": 24},
        )
        response.raise_for_status()
        return response.json()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(16)))
    assert len({r["request_id"] for r in results}) == 16
    assert all(r["completion_tokens"] == 24 and r["model_version"] == "1" for r in results)

    requests = metric(served.url, "bentoml_service_adaptive_batch_size_sum") - before_sum
    batches = metric(served.url, "bentoml_service_adaptive_batch_size_count") - before_count
    assert requests == 16
    assert requests / batches > 1, f"16 requests in {batches} batches: no batching"


def test_feedback_is_stored_and_counted(served, champion_home) -> None:
    from components.inference.store import InferenceStore

    generated = httpx.post(f"{served.url}/generate", json={"prompt": "Help?"}).json()
    before = metric(served.url, "flywheel_feedback_total", rating="down")
    body = {
        "request_id": generated["request_id"],
        "rating": "down",
        "correction": "Run make test.",
        "comment": "too vague",
    }
    first = httpx.post(f"{served.url}/feedback", json=body)
    again = httpx.post(f"{served.url}/feedback", json=body)
    assert first.status_code == again.status_code == 200
    assert first.json()["stored"] is True and again.json()["stored"] is False
    assert metric(served.url, "flywheel_feedback_total", rating="down") == before + 1

    unknown = httpx.post(f"{served.url}/feedback", json={"request_id": "nope", "rating": "up"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "request_id"

    store = InferenceStore()  # the same SQLite file under the served FLYWHEEL_HOME
    try:
        logged = store.get(generated["request_id"])
        assert logged is not None and logged.prompt == "Help?" and logged.model_version == "1"
        feedback = [f for f in store.feedback_since(0) if f.request_id == logged.request_id]
        assert feedback[0].correction == "Run make test."
    finally:
        store.close()


LONG = "word " * 3000

BAD_REQUESTS = [
    ("/generate", b'{"prompt": "hi", ', 400, None),
    ("/generate", b'{"prompt": "\xff\xfe"}', 400, None),
    ("/generate", b"[1, 2]", 400, None),
    ("/generate", b"{}", 422, "prompt"),
    ("/generate", b'{"prompt": 5}', 422, "prompt"),
    ("/generate", b'{"prompt": ""}', 422, "prompt"),
    ("/generate", b'{"prompt": "hi", "max_new_tokens": 0}', 422, "max_new_tokens"),
    ("/generate", b'{"prompt": "hi", "max_new_tokens": 100000}', 422, "max_new_tokens"),
    ("/generate", b'{"prompt": "hi", "temperature": 9}', 422, "temperature"),
    ("/generate", b'{"prompt": "hi", "top_p": 0}', 422, "top_p"),
    ("/generate", b'{"prompt": "hi", "colour": "red"}', 400, "colour"),
    ("/generate", json.dumps({"prompt": LONG}).encode(), 400, "prompt"),
    ("/generate", json.dumps({"prompt": "x" * 20000}).encode(), 413, "prompt"),
    ("/v1/chat/completions", b'{"messages": []}', 422, "messages"),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "robot", "content": "x"}]}',
        422,
        "messages.0.role",
    ),
    (
        "/v1/chat/completions",
        b'{"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}',
        404,
        "model",
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}',
        422,
        "max_tokens",
    ),
    ("/v1/completions", b'{"prompt": "x", "n": 9}', 422, "n"),
    ("/v1/completions", b'{"prompt": "x", "n": 2, "stream": true}', 422, "n"),
    ("/feedback", b'{"request_id": "x", "rating": "meh"}', 422, "rating"),
    # Wrong types in optional fields, on every route that has them.
    ("/generate", b'{"prompt": "hi", "stop": 5}', 422, "stop"),
    ("/generate", b'{"prompt": "hi", "stop": true}', 422, "stop"),
    ("/generate", b'{"prompt": "hi", "stop": ["ok", 3]}', 422, "stop.1"),
    ("/generate", b'{"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}', 422, "stop"),
    ("/generate", b'{"prompt": "hi", "temperature": "warm"}', 422, "temperature"),
    ("/generate", b'{"prompt": "hi", "top_p": [1]}', 422, "top_p"),
    ("/generate", b'{"prompt": "hi", "max_new_tokens": 2.5}', 422, "max_new_tokens"),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "stop": {}}',
        422,
        "stop",
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": 7}]}',
        422,
        "messages.0.content",
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "stream": "maybe"}',
        422,
        "stream",
    ),
    ("/v1/completions", b'{"prompt": "x", "stop": false}', 422, "stop"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": "many"}', 422, "max_tokens"),
    ("/feedback", b'{"request_id": "x", "rating": "up", "correction": 5}', 422, "correction"),
    ("/feedback", b'{"request_id": 12, "rating": "up"}', 422, "request_id"),
    # Numbers at the edges: huge integers, non-finite floats, values past the float range.
    (
        "/generate",
        b'{"prompt": "hi", "max_new_tokens": 1' + b"0" * 1000 + b"}",
        422,
        "max_new_tokens",
    ),
    ("/generate", b'{"prompt": "hi", "max_new_tokens": 1' + b"0" * 5000 + b"}", 400, None),
    ("/generate", b'{"prompt": "hi", "temperature": 1' + b"0" * 400 + b"}", 422, "temperature"),
    ("/generate", b'{"prompt": "hi", "temperature": 1e999}', 422, "temperature"),
    ("/generate", b'{"prompt": "hi", "temperature": NaN}', 422, "temperature"),
    ("/generate", b'{"prompt": "hi", "top_p": -Infinity}', 422, "top_p"),
    ("/v1/completions", b'{"prompt": "x", "temperature": Infinity}', 422, "temperature"),
    # Deeply nested JSON, in a known field and in an ignored one.
    ("/generate", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),
    ("/v1/completions", b'{"prompt": "x", "user": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
        422,
        "messages.0.content.0.type",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    BAD_REQUESTS,
    ids=[f"{p}-{s}-{param}" for p, _, s, param in BAD_REQUESTS],
)
def test_bad_input_gets_a_4xx_naming_the_field(served, path, body, status, param) -> None:
    response = httpx.post(
        f"{served.url}{path}",
        content=body,
        timeout=60,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]


def _openai_fields(kind: str) -> list[str]:
    """Every field of a request as the `openai` package types it."""
    from openai.types import completion_create_params as completions
    from openai.types.chat import completion_create_params as chat

    params = chat if kind == "chat" else completions
    return sorted({*params.CompletionCreateParamsBase.__annotations__, "stream"})


# What the service honours, with a value each; every other field of OpenAI's schema is refused.
_BOTH = {
    "max_tokens": 2,
    "n": 2,
    "seed": 7,
    "stop": ["\n\n"],
    "stream": False,
    "stream_options": {"include_usage": True},
    "temperature": 0.0,
    "top_p": 1.0,
    "user": "u-1",
}
HONOURED = {
    "chat": {
        "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 2,
        **_BOTH,
    },
    "completion": {"prompt": "hi", "echo": False, **_BOTH},
}
PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


@pytest.mark.parametrize(
    ("kind", "field"),
    [(kind, field) for kind in ("chat", "completion") for field in _openai_fields(kind)],
)
def test_every_openai_field_is_honoured_or_refused_by_name(served, kind, field) -> None:
    model = httpx.get(f"{served.url}/v1/models").json()["data"][0]["id"]
    base = {k: v for k, v in HONOURED[kind].items() if k in ("messages", "prompt")}
    if field == "model":
        body = {**base, "model": model}
    elif field in HONOURED[kind]:
        body = {**base, field: HONOURED[kind][field]}
    else:
        body = {**base, field: 1}
    response = httpx.post(f"{served.url}{PATHS[kind]}", json=body, timeout=60)
    if field == "model" or field in HONOURED[kind]:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["param"], error["code"]) == (field, "unsupported_parameter")


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_n_asks_for_several_whole_answers_each_logged(served, champion_home, kind) -> None:
    from openai import OpenAI, UnprocessableEntityError

    from components.inference.store import InferenceStore

    client = OpenAI(base_url=f"{served.url}/v1", api_key="unused")
    model = httpx.get(f"{served.url}/v1/models").json()["data"][0]["id"]
    ask = client.chat.completions.create if kind == "chat" else client.completions.create
    body = (
        {"messages": [{"role": "user", "content": "Say hi"}]}
        if kind == "chat"
        else {"prompt": "Say hi"}
    )
    reply = ask(model=model, n=2, max_tokens=3, temperature=0.9, **body)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.usage.completion_tokens == 6  # the tiny model never ends a turn early
    with InferenceStore(f"sqlite:///{champion_home / 'feedback.db'}") as store:
        logged = [store.get(reply.id), store.get(f"{reply.id}-1")]
    assert all(record is not None and record.completion_tokens == 3 for record in logged)
    with pytest.raises(UnprocessableEntityError) as refused:  # several choices come whole
        ask(model=model, n=2, stream=True, max_tokens=3, **body)
    assert refused.value.body["param"] == "n"


@pytest.mark.parametrize("path", ["/generate", "/v1/chat/completions", "/v1/completions"])
def test_a_seed_draws_the_same_sampled_answer_again(served, path) -> None:
    ask = {
        "/generate": {"prompt": "Name a colour", "max_new_tokens": 12},
        "/v1/chat/completions": {
            "messages": [{"role": "user", "content": "Name a colour"}],
            "max_tokens": 12,
        },
        "/v1/completions": {"prompt": "Name a colour", "max_tokens": 12},
    }[path]

    def text(seed: int) -> str:
        body = {**ask, "temperature": 1.5, "seed": seed}
        response = httpx.post(f"{served.url}{path}", json=body, timeout=60)
        assert response.status_code == 200, response.text
        reply = response.json()
        return reply["text"] if "text" in reply else str(reply["choices"][0])

    first = text(11)
    assert text(11) == first  # the same draws
    assert len({text(seed) for seed in range(12, 16)} | {first}) > 1  # other seeds, other draws


def test_content_parts_developer_and_name_reach_the_model(served, champion_home) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{served.url}/v1", api_key="unused")
    reply = client.chat.completions.create(
        model=httpx.get(f"{served.url}/v1/models").json()["data"][0]["id"],
        messages=[
            {"role": "developer", "content": "Answer briefly."},
            {"role": "user", "name": "dana", "content": [{"type": "text", "text": "Hi there"}]},
        ],
        max_tokens=2,
    )
    assert reply.choices[0].message.role == "assistant"
    from components.inference.store import InferenceStore

    with InferenceStore() as store:
        logged = store.get(reply.id)
    assert logged is not None and logged.prompt == "Answer briefly.\ndana: Hi there"


def test_service_survives_bad_input_without_server_errors(served) -> None:
    assert httpx.post(f"{served.url}/generate", json={"prompt": "still there?"}).status_code == 200
    assert metric(served.url, "bentoml_service_request_total", http_response_code="500") == 0
    log = served.log_path.read_text()
    assert "unexpected error" not in log


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/v1/models", "/"])
def test_every_response_carries_the_model_version(served, path) -> None:
    response = httpx.get(f"{served.url}{path}")
    assert response.status_code == 200
    assert response.headers["x-model-version"] == "1"


def test_every_answer_carries_its_trace_id_with_tracing_off(served) -> None:
    """Nothing is exported by default, but the id that would follow the answer is still
    answered and logged, so feedback on it can be traced once tracing is on."""
    from components.inference.store import InferenceStore

    answer = httpx.post(f"{served.url}/generate", json={"prompt": "hi", "max_new_tokens": 2})
    trace_id = answer.headers["x-trace-id"]
    assert len(trace_id) == 32 and int(trace_id, 16)
    other = httpx.post(f"{served.url}/generate", json={"prompt": "hi", "max_new_tokens": 2})
    assert other.headers["x-trace-id"] != trace_id
    with InferenceStore(f"sqlite:///{served.home / 'feedback.db'}") as logged:
        record = logged.get(answer.json()["request_id"])
    assert record is not None and record.trace_id == trace_id


def test_playground_page_is_served(served) -> None:
    page = httpx.get(served.url).text
    assert "Flywheel playground" in page and "/v1/chat/completions" in page


def test_overload_is_refused_quickly_not_queued_forever(champion_home, tmp_path) -> None:
    import time

    from tests.conftest import ServedService

    # Its own BENTOML_HOME: two services sharing one would share (and on start, wipe) the
    # Prometheus multiprocess folder, and the other service's /metrics would stop counting.
    service = ServedService(
        champion_home,
        env={"FLYWHEEL_SET": "serve.max_concurrency=2", "BENTOML_HOME": str(tmp_path / "bentoml")},
    )
    try:
        service.wait_ready()

        def call(_: int) -> tuple[int, float, str | None]:
            started = time.perf_counter()
            response = httpx.post(
                f"{service.url}/generate",
                timeout=120,
                json={"prompt": "Explain everything.", "max_new_tokens": 200},
            )
            return (
                response.status_code,
                time.perf_counter() - started,
                response.headers.get("retry-after"),
            )

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            results = list(pool.map(call, range(12)))
        statuses = [status for status, _, _ in results]
        assert 200 in statuses and 429 in statuses, statuses
        assert set(statuses) <= {200, 429}
        refusals = [(seconds, wait) for status, seconds, wait in results if status == 429]
        assert max(seconds for seconds, _ in refusals) < 2.0  # at once, not after a queue
        assert {wait for _, wait in refusals} == {"2"}  # and says when to come back
    finally:
        service.stop()


def test_monitor_reads_the_live_service(served) -> None:
    """The monitor's scrape of the real service: requests, tokens, and latency buckets fine
    enough between 10 s and 30 s that a quantile there is not a guess."""
    from components.monitor.scrape import scrape, service_window

    before = scrape(served.url)
    for _ in range(3):
        answer = httpx.post(f"{served.url}/generate", json={"prompt": "hi", "max_new_tokens": 4})
        assert answer.status_code == 200, answer.text
    window = service_window(before, scrape(served.url))
    assert window.requests == 3 and window.server_errors == 0
    assert window.model_version == "1" and window.tokens_per_s > 0
    assert window.p50_s is not None and window.p50_s < 30
    bounds = [le for le, _ in scrape(served.url).latency_buckets]
    assert sum(10 < le < 30 for le in bounds) >= 2


def test_unknown_routes_and_methods_answer_json(served) -> None:
    for status, response in (
        (404, httpx.get(f"{served.url}/no-such-route")),
        (405, httpx.post(f"{served.url}/metrics", json={})),  # one of BentoML's own routes
        (405, httpx.put(f"{served.url}/generate", json={"prompt": "hi"})),
    ):
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/json")
        assert response.json()["error"]["message"]
        assert response.headers["x-model-version"] == "1"


@pytest.mark.parametrize("path", ["/generate", "/v1/chat/completions", "/feedback"])
def test_state_changing_routes_take_json_only(served, path) -> None:
    # What a web page can send to another origin without asking first.
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"content-type": content_type} if content_type else {}
        response = httpx.post(f"{served.url}{path}", content=b'{"prompt": "hi"}', headers=headers)
        assert response.status_code == 415, (content_type, response.text)


def test_admin_reload_needs_the_admin_key(served, champion_home) -> None:
    url = f"{served.url}/admin/reload"
    body = {"model_uri": "models:/flywheel-llm-tiny/1"}
    assert httpx.post(url, json=body, timeout=60).status_code == 401
    wrong = httpx.post(url, json=body, headers={"authorization": "Bearer guess"}, timeout=60)
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    key = (champion_home / "admin.key").read_text().strip()  # made by the service on start
    auth = {"authorization": f"Bearer {key}"}
    as_text = httpx.post(
        url, content=b'{"model_uri": "x"}', headers={**auth, "content-type": "text/plain"}
    )
    assert as_text.status_code == 415
    reloaded = httpx.post(url, json=body, headers=auth, timeout=120)
    assert reloaded.status_code == 200 and reloaded.json()["version"] == "1"


def test_a_vanishing_temperature_neither_fails_nor_stalls_other_streams(served) -> None:
    import time

    def stream(temperature: float) -> tuple[int, str, float]:
        started = time.perf_counter()
        with httpx.stream(
            "POST",
            f"{served.url}/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 8,
                "stream": True,
                "temperature": temperature,
            },
            timeout=60,
        ) as response:
            lines = [line for line in response.iter_lines() if line]
        return response.status_code, lines[-1], time.perf_counter() - started

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(stream, [5e-324, 1e-300, 0.0, 0.7, 5e-324, 0.0]))
    assert [(status, last) for status, last, _ in results] == [(200, "data: [DONE]")] * 6
    assert max(seconds for _, _, seconds in results) < 30
    answer = httpx.post(
        f"{served.url}/generate", json={"prompt": "hi", "temperature": 1e-300, "max_new_tokens": 4}
    )
    assert answer.status_code == 200 and answer.json()["completion_tokens"] == 4


def _json_values():
    from hypothesis import strategies as st

    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(10**40), max_value=10**40)
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.text(max_size=20)
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
        ),
        max_leaves=6,
    )


def _value_for(schema: dict, definitions: dict):
    """Values a field's schema allows, mixed with arbitrary JSON of any other type."""
    from hypothesis import strategies as st

    if "$ref" in schema:
        schema = definitions[schema["$ref"].rsplit("/", 1)[1]]
    options = schema.get("anyOf") or [schema]
    typed = []
    for option in options:
        kind = option.get("type")
        if "enum" in option:
            typed.append(st.sampled_from(option["enum"]))
        elif kind == "string":
            typed.append(st.text(max_size=40))
        elif kind == "integer":
            typed.append(st.integers(min_value=-5, max_value=10**30) | st.integers(0, 8))
        elif kind == "number":
            typed.append(st.floats(allow_nan=False, allow_infinity=False) | st.floats(0, 2))
        elif kind == "boolean":
            typed.append(st.booleans())
        elif kind == "array":
            typed.append(st.lists(_value_for(option.get("items", {}), definitions), max_size=5))
        elif "$ref" in option:
            typed.append(_body_for(definitions[option["$ref"].rsplit("/", 1)[1]], definitions))
    return st.one_of(*typed, _json_values()) if typed else _json_values()


def _body_for(schema: dict, definitions: dict):
    from hypothesis import strategies as st

    properties = schema.get("properties", {})
    required = set(schema.get("required", []))
    return st.fixed_dictionaries(
        {k: _value_for(v, definitions) for k, v in properties.items() if k in required},
        optional={
            **{k: _value_for(v, definitions) for k, v in properties.items() if k not in required},
            "unexpected": _json_values(),
        },
    )


def test_fuzzed_bodies_never_get_a_server_error(served) -> None:
    """Bodies drawn from the service's own OpenAPI schema, valid and not, on every JSON route:
    each answer is a success or a JSON 4xx naming what is wrong, never a 5xx, and the service
    still answers afterwards. Bounded: a fixed number of examples per route."""
    import math

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    schema = httpx.get(f"{served.url}/openapi.json").json()
    definitions = schema["components"]["schemas"]
    routes = {
        path: item["post"]["requestBody"]["content"]["application/json"]["schema"]
        for path, item in schema["paths"].items()
        if "post" in item and "requestBody" in item["post"] and not path.startswith("/admin")
    }
    assert set(routes) == {"/generate", "/v1/chat/completions", "/v1/completions", "/feedback"}

    def encode(body) -> bytes:
        return json.dumps(body, allow_nan=True).encode()

    def fuzz(path: str, body) -> None:
        @settings(
            max_examples=40,
            deadline=None,
            database=None,  # nothing written into the working folder
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        )
        @given(payload=body.map(encode) | st.binary(max_size=64))
        def check(payload: bytes) -> None:
            response = httpx.post(
                f"{served.url}{path}",
                content=payload,
                headers={"content-type": "application/json"},
                timeout=120,
            )
            assert response.status_code < 500, (path, payload[:300], response.text[:300])
            if response.status_code >= 400:
                error = response.json()["error"]
                assert error["message"] and error["type"] == "invalid_request_error"
            elif "stream" not in response.headers.get("content-type", ""):
                assert all(
                    not isinstance(v, float) or math.isfinite(v) for v in response.json().values()
                )

        check()

    for path, body_schema in routes.items():
        fuzz(path, _body_for(definitions[body_schema["$ref"].rsplit("/", 1)[1]], definitions))
    assert httpx.post(f"{served.url}/generate", json={"prompt": "still fine?"}).status_code == 200
