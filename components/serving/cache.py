"""The response cache: a deterministic request (greedy decoding) asked again of the same
model version gets the answer it got the first time, without generating.

An entry is keyed by the model, its version, the runtime that made the answer and the whole
request (templated prompt, token limit, stop strings), so no version ever serves another's
answer; the entry carries its version and request digest again, and a read checks both. The
cache sits behind the correction memory: a correction still answers first.

`memory` keeps entries in this process (least recently used dropped first); `redis` shares
them between processes and restarts, with a time to live. A cache that cannot be reached is
a miss, never a failed request: each lookup and write waits at most `timeout_s`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Literal, Protocol

from components.config import ResponseCacheConfig
from components.model.generation import GenerationRequest, is_greedy
from components.settings import settings

log = logging.getLogger("flywheel.cache")

Lookup = Literal["hit", "miss", "error", "off"]  # what the cache did for one request


@dataclass(frozen=True)
class CachedAnswer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    confidence: float | None


@dataclass(frozen=True)
class CacheKey:
    version: str
    digest: str  # of the model, runtime and request
    key: str  # where the entry is stored


def cache_key(model: str, version: str, runtime: str, request: GenerationRequest) -> CacheKey:
    material = json.dumps(
        [model, version, runtime, request.prompt, request.max_new_tokens, list(request.stop)],
        ensure_ascii=False,
    )
    digest = hashlib.sha256(material.encode()).hexdigest()
    return CacheKey(version, digest, f"flywheel:response:{model}:{version}:{digest}")


def cacheable(request: GenerationRequest) -> bool:
    return is_greedy(request.temperature, request.top_p)


class CacheBackend(Protocol):
    def get(self, key: str) -> str | None: ...

    def set(self, key: str, value: str) -> None: ...


class MemoryBackend:
    """Entries in this process, the least recently used dropped beyond `max_entries`."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def set(self, key: str, value: str) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)


class RedisBackend:
    """Entries in a Redis server, each expiring `ttl_s` after it was written."""

    def __init__(self, url: str, ttl_s: int, timeout_s: float) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.ttl_s = ttl_s
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # a miss now beats an answer late
        )

    def get(self, key: str) -> str | None:
        value = self.client.get(key)
        return None if value is None else bytes(value).decode()  # type: ignore[arg-type]

    def set(self, key: str, value: str) -> None:
        self.client.set(key, value, ex=self.ttl_s)


class ResponseCache:
    """Looks answers up and stores them. A backend error is logged (at most once a minute)
    and reported as `error`, and the request is generated as if it had missed; for
    `RETRY_AFTER_S` after an error the backend is not asked at all, so a server that went
    away costs each request nothing, not a timeout."""

    RETRY_AFTER_S = 5.0

    def __init__(self, backend: CacheBackend, model: str) -> None:
        self.backend, self.model = backend, model
        self._warned_at = 0.0
        self._down_until = 0.0

    @classmethod
    def from_config(cls, config: ResponseCacheConfig, model: str) -> ResponseCache | None:
        if not config.enabled:
            return None
        if config.backend == "redis":
            url = settings().redis_url or config.redis_url
            return cls(RedisBackend(url, config.ttl_s, config.timeout_s), model)
        return cls(MemoryBackend(config.max_entries), model)

    def key(self, version: str, runtime: str, request: GenerationRequest) -> CacheKey:
        return cache_key(self.model, version, runtime, request)

    def get(self, key: CacheKey) -> tuple[Lookup, CachedAnswer | None]:
        if time.monotonic() < self._down_until:
            return "error", None
        try:
            raw = self.backend.get(key.key)
        except Exception as exc:
            self._failed("read", exc)
            return "error", None
        if raw is None:
            return "miss", None
        try:
            entry = json.loads(raw)
            if entry.pop("version") != key.version or entry.pop("digest") != key.digest:
                return "miss", None
            return "hit", CachedAnswer(**entry)
        except (ValueError, TypeError, KeyError):  # written by something else: replaced
            return "miss", None

    def put(self, key: CacheKey, answer: CachedAnswer) -> None:
        value = json.dumps({"version": key.version, "digest": key.digest, **asdict(answer)})
        try:
            self.backend.set(key.key, value)
        except Exception as exc:
            self._failed("write", exc)

    def _failed(self, what: str, exc: Exception) -> None:
        now = time.monotonic()
        self._down_until = now + self.RETRY_AFTER_S
        if now - self._warned_at >= 60:
            self._warned_at = now
            log.warning("response cache %s failed (%s); generating without it", what, exc)
