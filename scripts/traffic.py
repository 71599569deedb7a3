"""Simulated users for the demo: send prompts to the service, then rate the answers.

The ratings are drawn at a given thumbs-down share (seeded), not judged from the answers:
they stand in for people, so the demo can show what the monitor does with a shift in
feedback. Some thumbs-down carry a correction, as a user who knows better would send.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class Exchange:
    prompt: str
    request_id: str
    model_version: str
    text: str
    latency_ms: float


def send(url: str, prompts: list[str], max_new_tokens: int, concurrency: int = 8) -> list[Exchange]:
    """POST each prompt to `/generate`, `concurrency` at a time (adaptive batching groups them)."""

    def one(prompt: str) -> Exchange:
        response = httpx.post(
            f"{url}/generate",
            json={"prompt": prompt, "max_new_tokens": max_new_tokens},
            timeout=600,
        )
        response.raise_for_status()
        body = response.json()
        return Exchange(
            prompt, body["request_id"], body["model_version"], body["text"], body["latency_ms"]
        )

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, prompts))


def rate(
    url: str,
    exchanges: list[Exchange],
    down_share: float,
    correction: str | None = None,
    correction_share: float = 0.5,
    seed: int = 0,
) -> dict[str, int]:
    """Send thumbs up/down for each exchange; returns the counts sent."""
    rng = random.Random(seed)
    counts = {"up": 0, "down": 0, "corrections": 0}
    with httpx.Client(timeout=30) as client:
        for exchange in exchanges:
            body: dict[str, str] = {"request_id": exchange.request_id, "rating": "up"}
            if rng.random() < down_share:
                body["rating"] = "down"
                if correction and rng.random() < correction_share:
                    body["correction"] = correction
                    counts["corrections"] += 1
            client.post(f"{url}/feedback", json=body).raise_for_status()
            counts[body["rating"]] += 1
    return counts
