"""The response cache: greedy requests answered again without generating, keyed by version,
in memory and in a real Redis server; a cache that is away is a miss, not a failure."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from components.config import ResponseCacheConfig
from components.model.generation import GenerationRequest
from components.serving.cache import (
    CachedAnswer,
    MemoryBackend,
    RedisBackend,
    ResponseCache,
    cache_key,
    cacheable,
)
from tests.conftest import free_port

ANSWER = CachedAnswer("Paris.", prompt_tokens=7, completion_tokens=2, confidence=0.9)


def request(prompt: str = "capital of France?", **settings) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_new_tokens=8, **settings)


class RedisServer:
    """A real `redis-server` (the Debian package) on a free port, nothing saved to disk."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is missing: `make test` installs it (apt redis-server)"
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(folder)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        import redis

        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                assert self.process.poll() is None, "redis-server exited at start"
                assert time.monotonic() < deadline, "redis-server did not answer in 20 s"
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def test_the_key_names_the_version_the_runtime_and_every_setting_that_changes_the_answer() -> None:
    base = cache_key("m", "1", "openvino-int8", request())
    variants = [
        cache_key("other", "1", "openvino-int8", request()),
        cache_key("m", "2", "openvino-int8", request()),
        cache_key("m", "1", "transformers-float32", request()),
        cache_key("m", "1", "openvino-int8", request("capital of Spain?")),
        cache_key("m", "1", "openvino-int8", replace(request(), max_new_tokens=9)),
        cache_key("m", "1", "openvino-int8", request(stop=("\n",))),
    ]
    assert len({base.key, *(v.key for v in variants)}) == 1 + len(variants)
    assert base == cache_key("m", "1", "openvino-int8", request())


def test_only_greedy_requests_are_cached() -> None:
    assert cacheable(request()) and cacheable(request(temperature=1e-9))
    assert cacheable(request(temperature=0.8, top_p=0.0))  # keeps the top token: greedy
    assert not cacheable(request(temperature=0.8))


def test_the_memory_backend_drops_the_least_recently_used() -> None:
    backend = MemoryBackend(max_entries=2)
    backend.set("a", "1")
    backend.set("b", "2")
    assert backend.get("a") == "1"  # a is now the most recent
    backend.set("c", "3")
    assert backend.get("b") is None and backend.get("a") == "1" and backend.get("c") == "3"


def test_an_entry_is_never_served_for_another_version() -> None:
    cache = ResponseCache(MemoryBackend(10), "m")
    v1 = cache.key("1", "rt", request())
    cache.put(v1, ANSWER)
    assert cache.get(v1) == ("hit", ANSWER)
    assert cache.get(cache.key("2", "rt", request())) == ("miss", None)
    # Even an entry stored under another version's key (a collision, a stray writer) is a miss.
    v2 = cache.key("2", "rt", request())
    cache.backend.set(v2.key, cache.backend.get(v1.key) or "")
    assert cache.get(v2) == ("miss", None)
    cache.backend.set(v1.key, "not json")
    assert cache.get(v1) == ("miss", None)


def test_redis_shares_entries_between_processes_with_a_time_to_live(redis_server) -> None:
    config = ResponseCacheConfig(backend="redis", redis_url=redis_server.url, ttl_s=600)
    writer = ResponseCache.from_config(config, "m")
    reader = ResponseCache.from_config(config, "m")  # another generator, or after a restart
    assert writer is not None and reader is not None
    key = writer.key("1", "rt", request())
    assert reader.get(key) == ("miss", None)
    writer.put(key, ANSWER)
    assert reader.get(key) == ("hit", ANSWER)
    assert isinstance(reader.backend, RedisBackend)
    assert 0 < int(reader.backend.client.ttl(key.key)) <= 600  # type: ignore[arg-type]
    assert reader.get(reader.key("2", "rt", request())) == ("miss", None)


def test_an_unreachable_redis_is_an_error_lookup_within_the_timeout_not_a_failure() -> None:
    config = ResponseCacheConfig(
        backend="redis", redis_url=f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2
    )
    cache = ResponseCache.from_config(config, "m")
    assert cache is not None
    key = cache.key("1", "rt", request())
    started = time.monotonic()
    assert cache.get(key) == ("error", None)
    cache.put(key, ANSWER)  # logged, not raised
    assert time.monotonic() - started < 2
    # Right after an error the server is not asked again: no timeout per request.
    cache.backend = None  # type: ignore[assignment]  # would raise if it were used
    assert cache.get(key) == ("error", None)


class CountingEngine:
    """The real tiny model's engine, counting the requests that reach it."""

    def __init__(self, engine) -> None:
        self.engine, self.name, self.runtime = engine, engine.name, engine.runtime
        self.failure = None
        self.generated: list[str] = []

    def generate(self, requests):
        self.generated += [r.prompt for r in requests]
        return self.engine.generate(requests)

    def stream(self, request):
        self.generated.append(request.prompt)
        return self.engine.stream(request)

    def close(self) -> None:
        self.engine.close()


def test_a_served_version_generates_a_greedy_request_once(champion_home, monkeypatch) -> None:
    from components.serving.loading import LoadedModel
    from components.serving.model import ServedModel
    from components.serving.protocol import GenerationInput

    monkeypatch.setenv("FLYWHEEL_HOME", str(champion_home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{champion_home / 'mlflow.db'}")
    monkeypatch.setenv("FLYWHEEL_PROFILE", "tiny")
    served = ServedModel.from_uri("models:/flywheel-llm-tiny/1", warmup=False)
    engine = CountingEngine(served.loaded.engine)
    v1 = replace(served.loaded, engine=engine)
    served._current = v1

    def ask(text: str, **settings) -> GenerationInput:
        return GenerationInput(
            messages=[{"role": "user", "content": text}], max_new_tokens=4, **settings
        )

    first, sampled = served.generate([ask("Hello"), ask("Hello", temperature=0.9)])
    again = served.generate([ask("Hello")])[0]
    assert (first.cache, sampled.cache, again.cache) == ("miss", "off", "hit")
    assert (again.text, again.completion_tokens) == (first.text, first.completion_tokens)
    assert again.confidence == first.confidence and again.model_version == "1"
    assert len(engine.generated) == 2  # the hit never reached the engine

    streamed = list(served.stream(ask("Hello")))
    assert [o.cache for o in streamed] == ["hit", "hit"]
    assert "".join(o.text for o in streamed) == first.text
    assert streamed[-1].completion_tokens == first.completion_tokens
    assert len(engine.generated) == 2

    # A request the model rejects is not cached; the same request to another version misses.
    too_long = served.generate([ask("word " * 5000)])[0]
    assert too_long.error_code == "context_length_exceeded" and too_long.cache == "off"
    served._current = LoadedModel("flywheel-llm-tiny", "2", engine, v1.tokenizer, 2048)
    assert served.generate([ask("Hello")])[0].cache == "miss"
    assert len(engine.generated) == 3


def test_the_service_caches_in_redis_says_so_and_survives_losing_it(
    champion_home, redis_server, tmp_path
) -> None:
    from tests.conftest import ServedService

    settings = f"serve.cache.backend=redis serve.cache.redis_url={redis_server.url}"
    service = ServedService(
        champion_home, env={"FLYWHEEL_SET": settings, "BENTOML_HOME": str(tmp_path / "bentoml")}
    )
    body = {"prompt": "Which port does the cache listen on?", "max_new_tokens": 6}
    chat = {"messages": [{"role": "user", "content": body["prompt"]}], "max_tokens": 6}
    try:
        service.wait_ready()
        first = httpx.post(f"{service.url}/generate", json=body, timeout=60)
        again = httpx.post(f"{service.url}/generate", json=body, timeout=60)
        assert first.status_code == again.status_code == 200
        assert (first.headers["x-flywheel-cache"], again.headers["x-flywheel-cache"]) == (
            "miss",
            "hit",
        )
        assert again.json()["text"] == first.json()["text"]
        assert again.headers["x-model-version"] == first.headers["x-model-version"] == "1"
        assert again.json()["request_id"] != first.json()["request_id"]  # logged on its own

        with httpx.stream(
            "POST", f"{service.url}/v1/chat/completions", json={**chat, "stream": True}, timeout=60
        ) as stream:
            assert stream.headers["x-flywheel-cache"] == "hit"
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        sampled = httpx.post(
            f"{service.url}/generate", json={**body, "temperature": 0.9}, timeout=60
        )
        assert sampled.headers["x-flywheel-cache"] == "off"

        import redis

        keys = redis.Redis.from_url(redis_server.url).keys(
            "flywheel:response:flywheel-llm-tiny:1:*"
        )
        assert len(keys) == 1  # the one greedy request, stored once for its version

        metrics = httpx.get(f"{service.url}/metrics", timeout=30).text
        assert 'flywheel_response_cache_lookups_total{result="hit"} 2.0' in metrics
        assert 'flywheel_response_cache_lookups_total{result="miss"} 1.0' in metrics

        redis_server.stop()  # the cache goes away: answers go on, generated
        started = time.monotonic()
        lost = httpx.post(f"{service.url}/generate", json=body, timeout=60)
        assert lost.status_code == 200 and lost.headers["x-flywheel-cache"] == "error"
        assert lost.json()["text"] == first.json()["text"]
        assert time.monotonic() - started < 30
    finally:
        service.stop()
