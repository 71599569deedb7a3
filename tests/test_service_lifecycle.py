"""A real `bentoml serve` through its life: start without a champion, shut down under load, and
keep serving while the inference store is locked by another process."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from components.inference.store import InferenceStore
from components.serving.deploy import DRAIN_TIMEOUT_S, SHUTDOWN_TIMEOUT_S
from tests.conftest import ServedService, sqlite_uri

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def wait_until_up(service: ServedService, timeout: float = 180) -> None:
    """The process answers (/healthz), whether or not the model is ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert service.process.poll() is None, service.server.log_tail()
        try:
            if httpx.get(f"{service.url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(service.server.log_tail())


def test_without_a_champion_readyz_says_so_at_once(tmp_path: Path) -> None:
    home = tmp_path / "empty-home"
    home.mkdir()
    service = ServedService(home)
    try:
        wait_until_up(service)
        started = time.perf_counter()
        ready = httpx.get(f"{service.url}/readyz", timeout=10)
        assert ready.status_code == 503 and time.perf_counter() - started < 5
        deadline = time.monotonic() + 60  # until the background load has looked the model up
        while True:
            answer = httpx.post(f"{service.url}/generate", json={"prompt": "hi"}, timeout=10)
            assert answer.status_code == 503 and answer.headers["retry-after"] == "2"
            if "still loading" not in answer.text or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        line = f"no champion for flywheel-llm-tiny in {sqlite_uri(home)}: run make train first"
        assert line in answer.json()["error"]["message"]
        log = service.log_path.read_text()
        assert log.count(line) == 1, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
        assert service.process.poll() is None  # no crash loop: the service waits, not ready
    finally:
        service.stop()


def _answered(url: str, i: int) -> tuple[int, str | None]:
    try:
        response = httpx.post(
            f"{url}/generate",
            json={"prompt": f"question {i}", "max_new_tokens": 48},
            timeout=120,
        )
    except httpx.HTTPError as exc:  # refused after the listener closed: never answered
        return -1, type(exc).__name__
    if response.status_code == 200:
        return 200, response.json()["request_id"]
    return response.status_code, response.headers.get("retry-after")


def _streamed(url: str, i: int) -> tuple[int, str | None]:
    body = {
        "messages": [{"role": "user", "content": f"stream {i}"}],
        "max_tokens": 48,
        "stream": True,
    }
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
            lines = [line for line in r.iter_lines() if line]
            return r.status_code, lines[-1] if r.status_code == 200 else r.headers.get(
                "retry-after"
            )
    except httpx.HTTPError as exc:
        return -1, type(exc).__name__


def test_sigterm_under_load_drains_within_the_bound_and_logs_every_answer(
    champion_home: Path, tmp_path: Path
) -> None:
    service = ServedService(champion_home, env={"BENTOML_HOME": str(tmp_path / "bentoml")})
    service.wait_ready()
    # The served version is known from the first response, health routes included.
    assert httpx.get(f"{service.url}/healthz").headers["x-model-version"] == "1"
    url = service.url
    stop_at = time.monotonic() + 3.0

    def client(i: int) -> list[tuple[str, int, str | None]]:
        results = []
        while time.monotonic() < stop_at + 6:  # keeps sending after the SIGTERM
            kind = "stream" if i % 4 == 0 else "generate"
            status, detail = (_streamed if kind == "stream" else _answered)(url, i)
            results.append((kind, status, detail))
            if status == -1:
                break
        return results

    assert httpx.get(f"{service.url}/health").status_code == 200  # as other servers name it
    readiness: list[int] = []
    prober = httpx.Client(timeout=30)  # a load balancer's connection, open before the SIGTERM
    assert prober.get(f"{url}/readyz").status_code == 200

    def probe_readiness() -> None:  # what it sees from the SIGTERM on
        while service.process.poll() is None:
            try:
                readiness.append(prober.get(f"{url}/readyz").status_code)
            except httpx.HTTPError:
                readiness.append(-1)  # refused at the socket: not ready either
                break
            time.sleep(0.05)

    with concurrent.futures.ThreadPoolExecutor(13) as pool:
        futures = [pool.submit(client, i) for i in range(12)]
        time.sleep(max(0.0, stop_at - time.monotonic()))
        os.killpg(service.process.pid, signal.SIGTERM)
        signalled = time.monotonic()
        probed = pool.submit(probe_readiness)
        service.process.wait(timeout=SHUTDOWN_TIMEOUT_S + 30)
        exited_after = time.monotonic() - signalled
        results = [r for f in futures for r in f.result()]
        probed.result()

    assert exited_after < SHUTDOWN_TIMEOUT_S, exited_after
    # Not ready from the SIGTERM on: 503 (service/edge.py), or no longer reachable at all.
    assert readiness and 200 not in readiness, readiness
    assert service.process.returncode == 0
    # Answered, refused while draining, or refused at the socket; nothing else.
    unexpected = [r for r in results if r[1] not in (200, 503, -1)]
    assert not unexpected, (unexpected, service.log_path.read_text()[-6000:])
    answered = [detail for kind, status, detail in results if kind == "generate" and status == 200]
    streams = [detail for kind, status, detail in results if kind == "stream" and status == 200]
    assert answered and all(last == "data: [DONE]" for last in streams)  # none was cut off
    assert all(detail == "2" for _, status, detail in results if status == 503)
    with InferenceStore(sqlite_uri_of(champion_home)) as store:
        missing = [rid for rid in answered if store.get(rid) is None]
    assert not missing, f"{len(missing)} of {len(answered)} answered requests were not logged"


def _children(pid: int) -> dict[int, str]:
    """The processes under `pid`, with their command lines."""
    import subprocess

    rows = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    parent = {int(r.split()[0]): int(r.split()[1]) for r in rows}
    args = {int(r.split()[0]): r.split(None, 2)[2] for r in rows}

    def under(p: int) -> bool:
        while p in parent and p != pid:
            p = parent[p]
        return p == pid

    return {p: a for p, a in args.items() if p != pid and under(p)}


def test_a_killed_generator_is_not_ready_promptly_and_sigterm_still_stops_the_service(
    champion_home: Path, tmp_path: Path
) -> None:
    """Kill the generator process: while it comes back, /readyz answers 503 within its probe
    bound and /generate fails fast; once it is back, SIGTERM to the service's main process
    stops every process within the bound (no probe left waiting holds the drain up)."""
    service = ServedService(champion_home, env={"BENTOML_HOME": str(tmp_path / "bentoml")})
    try:
        service.wait_ready()
        url = service.url
        [generator] = [
            p for p, a in _children(service.process.pid).items() if "flywheel-generator" in a
        ]
        os.kill(generator, signal.SIGKILL)
        statuses, deadline = [], time.monotonic() + 180
        while time.monotonic() < deadline:
            started = time.monotonic()
            status = httpx.get(f"{url}/readyz", timeout=30).status_code
            assert time.monotonic() - started < 10, "a readiness probe waited"
            statuses.append(status)
            if status == 200:
                break
            asked = time.monotonic()
            answer = httpx.post(f"{url}/generate", json={"prompt": "hi"}, timeout=60)
            assert answer.status_code in (200, 503) and time.monotonic() - asked < 30
            time.sleep(0.5)
        assert statuses[-1] == 200 and 503 in statuses, statuses
        assert generator not in _children(service.process.pid)  # a new one serves
        answer = httpx.post(f"{url}/generate", json={"prompt": "hi", "max_new_tokens": 3})
        assert answer.status_code == 200, answer.text
        signalled = time.monotonic()
        service.process.send_signal(signal.SIGTERM)  # the main process only, as `kill` does
        service.process.wait(timeout=SHUTDOWN_TIMEOUT_S + 30)
        # Nothing in flight: it must not wait out the drain's timeout for a forgotten probe.
        assert time.monotonic() - signalled < DRAIN_TIMEOUT_S
        assert service.process.returncode == 0
    finally:
        service.stop()


def sqlite_uri_of(home: Path) -> str:
    return f"sqlite:///{home / 'feedback.db'}"


def test_a_store_locked_for_10_seconds_loses_nothing(champion_home: Path, tmp_path: Path) -> None:
    import sqlite3

    service = ServedService(champion_home, env={"BENTOML_HOME": str(tmp_path / "bentoml")})
    service.wait_ready()
    first = httpx.post(f"{service.url}/generate", json={"prompt": "before"}, timeout=60).json()

    try:
        lock = sqlite3.connect(
            champion_home / "feedback.db", isolation_level=None, check_same_thread=False
        )
        lock.execute("BEGIN EXCLUSIVE")
        locked_at = time.monotonic()
        try:
            # Answered while the store is locked: the lock is released only after all of them, so
            # a request that waited for the database would time out here.
            ids = []
            for i in range(10):
                response = httpx.post(
                    f"{service.url}/generate", json={"prompt": f"during {i}"}, timeout=60
                )
                assert response.status_code == 200, response.text
                ids.append(response.json()["request_id"])
            assert httpx.get(f"{service.url}/healthz", timeout=5).status_code == 200
            time.sleep(max(0.0, 10.0 - (time.monotonic() - locked_at)))  # at least 10 seconds
        finally:
            lock.execute("COMMIT")
            lock.close()
        feedback = httpx.post(
            f"{service.url}/feedback",
            json={"request_id": ids[3], "rating": "down", "correction": "a fix"},
            timeout=60,
        )  # waits, off the event loop, until its generation is written
        assert feedback.status_code == 200, feedback.text
        assert feedback.json()["stored"] is True
    finally:
        service.stop()
    with InferenceStore(sqlite_uri_of(champion_home)) as store:
        assert all(store.get(rid) is not None for rid in [first["request_id"], *ids])
        rated = [f for f in store.feedback_since(0) if f.request_id == ids[3]]
        assert rated and rated[0].correction == "a fix"


def test_memory_answers_at_once_and_survives_a_restart(champion_home: Path, tmp_path: Path) -> None:
    """Through the public API of a real service with `memory.trust: feedback`: a correction
    answers the same and a rephrased question at once; the entry survives a restart; a service
    that trusts reviewed corrections only does not serve it."""
    fact = {
        "q": "Which Slack channel receives the retrain alerts?",
        "p": "Where in Slack are retrain alerts posted?",
        "a": "Retrain alerts go to the #ml-retrain-alerts channel.",
    }
    trusting = {"FLYWHEEL_SET": "memory.trust=feedback", "BENTOML_HOME": str(tmp_path / "b1")}

    def ask(url: str, prompt: str, memory: str | None = None) -> tuple[str, dict]:
        headers = {"x-flywheel-memory": memory} if memory else {}
        body = {"prompt": prompt, "max_new_tokens": 8}
        response = httpx.post(f"{url}/generate", json=body, headers=headers, timeout=60)
        assert response.status_code == 200, response.text
        return response.headers["x-flywheel-memory"], response.json()

    service = ServedService(champion_home, env=trusting)
    try:
        service.wait_ready()
        status, first = ask(service.url, fact["q"])
        assert status == "miss"
        feedback = httpx.post(
            f"{service.url}/feedback",
            json={"request_id": first["request_id"], "rating": "down", "correction": fact["a"]},
            timeout=60,
        )
        assert feedback.json()["memory"].startswith("kept as mem-"), feedback.text
        for question in (fact["q"], fact["p"]):
            status, answer = ask(service.url, question)
            assert (status, answer["text"]) == ("hit", fact["a"])
        assert ask(service.url, "What should I cook tonight?")[0] == "miss"
        off = ask(service.url, fact["q"], memory="off")
        assert off[0] == "off" and off[1]["text"] != fact["a"]
        metrics = httpx.get(f"{service.url}/metrics").text
        assert 'flywheel_memory_lookups_total{result="hit"}' in metrics
    finally:
        service.stop()

    restarted = ServedService(champion_home, env=trusting)
    try:
        restarted.wait_ready()
        assert ask(restarted.url, fact["p"])[0] == "hit"
    finally:
        restarted.stop()

    reviewed = ServedService(champion_home, env={"BENTOML_HOME": str(tmp_path / "b2")})
    try:
        reviewed.wait_ready()
        assert ask(reviewed.url, fact["q"])[0] == "miss"  # a user's correction is not reviewed
    finally:
        reviewed.stop()


def test_the_memory_tells_siblings_apart(champion_home: Path, tmp_path: Path) -> None:
    """Through the public API of a real service: three corrections that differ in one word
    (the region) are each answered for their own region, in other words too; a region that
    was never taught and an unrelated prompt are left to the model, and the inference log says
    why; `GET /admin/memory` shows what tells each entry apart and its siblings."""
    regions = {"Frankfurt": "02:00", "Oregon": "05:30", "Singapore": "21:15"}
    facts = {
        region: {
            "q": f"When does the nightly database backup run in the {region} region?",
            "a": f"The nightly database backup in the {region} region runs at {time_} UTC.",
        }
        for region, time_ in regions.items()
    }
    admin = {"authorization": "Bearer test-admin-key"}
    env = {
        "FLYWHEEL_SET": "memory.trust=feedback",
        "FLYWHEEL_ADMIN_KEY": "test-admin-key",
        "BENTOML_HOME": str(tmp_path / "bentoml"),
    }

    def ask(prompt: str) -> tuple[str, dict]:
        body = {"prompt": prompt, "max_new_tokens": 8}
        response = httpx.post(f"{service.url}/generate", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.headers["x-flywheel-memory"], response.json()

    service = ServedService(champion_home, env=env)
    try:
        service.wait_ready()
        for fact in facts.values():
            first = ask(fact["q"])[1]
            feedback = httpx.post(
                f"{service.url}/feedback",
                json={"request_id": first["request_id"], "rating": "down", "correction": fact["a"]},
                timeout=60,
            )
            assert feedback.json()["memory"].startswith("kept as mem-"), feedback.text
        for region, fact in facts.items():
            status, answer = ask(fact["q"])
            assert (status, answer["text"]) == ("hit", fact["a"])
            rephrased = (
                f"For the {region} region, at what time is the database backed up each night?"
            )
            status, answer = ask(rephrased)
            assert (status, answer["text"]) == ("hit", fact["a"]), (region, answer["text"])
        untaught = "When does the nightly database backup run in the Sydney region?"
        unrelated = "What is a good name for a grey cat?"
        misses = []
        for prompt in (untaught, unrelated):
            status, answer = ask(prompt)
            assert status == "miss" and not any(t in answer["text"] for t in regions.values())
            misses.append(answer["request_id"])
        listed = httpx.get(f"{service.url}/admin/memory", headers=admin, timeout=30).json()
        by_answer = {e["answer"]: e for e in listed["entries"]}
        for region, fact in facts.items():
            entry = by_answer[fact["a"]]
            assert region.lower() in entry["distinguishing"], entry
            assert len(entry["siblings"]) == 2 and entry["id"] not in entry["siblings"]
    finally:
        service.stop()
    with InferenceStore(sqlite_uri_of(champion_home)) as store:
        notes = [store.get(request_id).memory_note for request_id in misses]
    assert notes[0] == "the question names sydney, the correction not", notes  # why it stayed out
    assert notes[1].startswith("no correction fits"), notes


def test_named_keys_are_the_clients_that_agree_and_are_limited(
    champion_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through a real service with `FLYWHEEL_API_KEYS`: a forged bearer is refused; one key
    cannot agree with itself nor pass its hourly limit; a second key's correction makes the
    agreement, and the feedback log says which key sent what. Curation for training takes
    what the memory took: the correction it refused is never curated."""
    import hashlib

    from components.config import load_profile
    from components.data.curated import user_corrections

    keys = {"alice": "alice-key-1", "bob": "bob-key-2"}
    key_file = tmp_path / "api-keys"
    key_file.write_text(
        "".join(f"{n}: {hashlib.sha256(k.encode()).hexdigest()}\n" for n, k in keys.items())
    )
    env = {
        "FLYWHEEL_API_KEYS": str(key_file),
        "FLYWHEEL_SET": "memory.trust=feedback memory.min_agreement=2 "
        "memory.corrections_per_client_per_hour=1",
        "BENTOML_HOME": str(tmp_path / "bentoml"),
    }
    question = "Which door badge opens the Harbor Street server room?"
    correction = "The Harbor Street server room opens with a blue level-3 badge."

    def ask(key: str) -> tuple[str, dict]:
        response = httpx.post(
            f"{service.url}/generate",
            json={"prompt": question, "max_new_tokens": 8},
            headers={"authorization": f"Bearer {key}"},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        return response.headers["x-flywheel-memory"], response.json()

    def correct(key: str, answer: dict) -> str:
        response = httpx.post(
            f"{service.url}/feedback",
            json={"request_id": answer["request_id"], "rating": "down", "correction": correction},
            headers={"authorization": f"Bearer {key}"},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        return response.json()["memory"]

    service = ServedService(champion_home, env=env)
    try:
        service.wait_ready()
        for forged in (
            "",
            "Bearer made-up",
            f"Bearer {hashlib.sha256(b'alice-key-1').hexdigest()}",
        ):
            refused = httpx.post(
                f"{service.url}/generate",
                json={"prompt": question},
                headers={"authorization": forged} if forged else {},
                timeout=60,
            )
            assert refused.status_code == 401, refused.text
        first = ask(keys["alice"])[1]
        assert correct(keys["alice"], first).startswith("kept as mem-")
        assert ask(keys["alice"])[0] == "miss"  # one client does not agree with itself
        again = correct(keys["alice"], ask(keys["alice"])[1])
        assert again.startswith("not kept: this client sent 1 corrections"), again
        agreeing = ask(keys["bob"])[1]
        assert correct(keys["bob"], agreeing).startswith("kept as mem-")
        kept = [first["request_id"], agreeing["request_id"]]
        status, answer = ask(keys["bob"])
        assert (status, answer["text"]) == ("hit", correction)
    finally:
        service.stop()
    with InferenceStore(sqlite_uri_of(champion_home)) as store:
        senders = {f.client for f in store.feedback_since(0) if f.correction == correction}
    assert senders == {"key:alice", "key:bob"}
    monkeypatch.setenv("FLYWHEEL_FEEDBACK_DB", sqlite_uri_of(champion_home))
    monkeypatch.setenv("FLYWHEEL_SET", env["FLYWHEEL_SET"])
    curated = user_corrections(load_profile("tiny"), 0.0)
    assert curated.policy["refused"].get("rate_limited", 0) >= 1
    ours = [i for i in curated.items if i.answer == correction]  # (other tests share the log)
    assert sorted(i.request_id for i in ours) == sorted(kept)  # the refused one is not curated
    assert {i.rule for i in ours} == {"agreement"}
