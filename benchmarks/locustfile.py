"""Locust load test of a deployed Flywheel service: the traffic its users make.

    make loadtest URL=http://flywheel:3000 USERS=32 DURATION=2m
    .venv-locust/bin/locust -f benchmarks/locustfile.py --host http://localhost:3000   # web UI

Each simulated user asks questions from the frozen test split (or `FLYWHEEL_LOAD_PROMPTS`, a
JSONL file of {"instruction": ...} rows) through the three ways clients call the service:
`/generate`, the OpenAI chat API, and the chat API streaming (its time to first token is
reported as the request `chat stream: first token`). One answer in `FLYWHEEL_LOAD_RATE_EVERY`
is rated, up or down, through `/feedback`, as users do. `FLYWHEEL_API_KEY` is sent as the
bearer token when the service needs one. 429 and 503 answers, the service shedding load,
count as failures: a run at a sustainable load has none.

This file runs in its own environment (`make loadtest-setup`: Locust and its gevent stack
stay out of the project's), so it imports nothing from the project.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

from locust import HttpUser, between, events, task

PROMPTS_FILE = Path(
    os.environ.get(
        "FLYWHEEL_LOAD_PROMPTS", Path(__file__).resolve().parent.parent / "data/seed/test.jsonl"
    )
)
MAX_TOKENS = int(os.environ.get("FLYWHEEL_LOAD_MAX_TOKENS", "32"))
RATE_EVERY = int(os.environ.get("FLYWHEEL_LOAD_RATE_EVERY", "5"))


def read_prompts(path: Path) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    prompts = [str(row["instruction"]) for row in rows if row.get("instruction")]
    if not prompts:
        raise SystemExit(f"no prompts in {path} (JSONL rows with an 'instruction')")
    return prompts


PROMPTS = read_prompts(PROMPTS_FILE)


class FlywheelUser(HttpUser):
    """A client that asks, reads the answer, sometimes rates it, and thinks a little."""

    wait_time = between(0.1, 1.0)

    def on_start(self) -> None:
        key = os.environ.get("FLYWHEEL_API_KEY")
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"
        self.answered = 0
        models = self.client.get("/v1/models", name="models").json()["data"]
        self.model = models[0]["id"]  # the name the service serves under

    def prompt(self) -> str:
        return random.choice(PROMPTS)

    def chat_body(self, stream: bool) -> dict:
        """An OpenAI chat request for one of the prompts."""
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": self.prompt()}],
            "max_tokens": MAX_TOKENS,
            "stream": stream,
        }

    def rate(self, request_id: str | None) -> None:
        self.answered += 1
        if request_id is None or self.answered % RATE_EVERY:
            return
        rating = random.choice(["up", "down"])
        self.client.post(
            "/feedback", json={"request_id": request_id, "rating": rating}, name="feedback"
        )

    @task(3)
    def generate(self) -> None:
        with self.client.post(
            "/generate",
            json={"prompt": self.prompt(), "max_new_tokens": MAX_TOKENS},
            name="generate",
            catch_response=True,
        ) as response:
            body = response.json() if response.ok else {}
            if response.ok and not isinstance(body.get("text"), str):
                response.failure("no text in the answer")
        self.rate(body.get("request_id"))

    @task(2)
    def chat(self) -> None:
        with self.client.post(
            "/v1/chat/completions",
            json=self.chat_body(stream=False),
            name="chat",
            catch_response=True,
        ) as response:
            body = response.json() if response.ok else {}
            if response.ok and not body.get("choices"):
                response.failure("no choices in the answer")
        self.rate(body.get("id"))

    @task(1)
    def chat_stream(self) -> None:
        started = time.perf_counter()
        first: float | None = None
        with self.client.post(
            "/v1/chat/completions",
            json=self.chat_body(stream=True),
            name="chat stream",
            stream=True,
            catch_response=True,
        ) as response:
            done = False
            for line in response.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                if first is None:
                    first = time.perf_counter()
                done = done or line == b"data: [DONE]"
            if response.ok and not done:
                response.failure("the stream ended without [DONE]")
        if first is not None:
            events.request.fire(
                request_type="SSE",
                name="chat stream: first token",
                response_time=(first - started) * 1000,
                response_length=0,
                exception=None,
                context={},
            )
