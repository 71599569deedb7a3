"""Simulated users for the demo: they ask questions, read the answers and judge them.

Each question has a reference answer. The rule a simulated user follows (`satisfied`):
- a fact question (one with a `key`, such as a port or a name) is answered when the answer
  contains the key, whatever the wording;
- any other question is answered when at least `min_overlap` (one in five) of the answer's
  content words (the words left after a few function words) come from the reference: on
  topic and not made up, even when the token limit cut the answer short.
A user rates an answer up when satisfied and down otherwise; a user who rates down sends the
reference as a correction with probability `correction_share` (seeded), as someone who knows
better would (the demo's users know their team's facts, not the answers to their how-to
questions).
"""

from __future__ import annotations

import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from components.text import FUNCTION_WORDS, normalize_text, word_list


@dataclass(frozen=True)
class Question:
    prompt: str
    reference: str
    key: str | None = None  # the fact a right answer must contain


@dataclass(frozen=True)
class Exchange:
    question: Question
    request_id: str
    model_version: str
    text: str
    memory: str  # the x-flywheel-memory answer: hit, miss or off


def satisfied(question: Question, answer: str, min_overlap: float = 0.2) -> bool:
    """Whether a simulated user takes `answer` as a right answer to `question`."""
    if question.key is not None:
        return question.key.lower() in normalize_text(answer).lower()
    said = {w for w in word_list(answer) if w not in FUNCTION_WORDS}
    return bool(said) and len(said & set(word_list(question.reference))) / len(said) >= min_overlap


def send(
    url: str,
    questions: list[Question],
    max_new_tokens: int,
    memory: str | None = None,
    concurrency: int = 8,
) -> list[Exchange]:
    """POST each question to `/generate`, `concurrency` at a time; `memory="off"` asks the
    model alone."""
    headers = {"x-flywheel-memory": memory} if memory else {}

    def one(question: Question) -> Exchange:
        response = httpx.post(
            f"{url}/generate",
            json={"prompt": question.prompt, "max_new_tokens": max_new_tokens},
            headers=headers,
            timeout=600,
        )
        response.raise_for_status()
        body = response.json()
        return Exchange(
            question,
            body["request_id"],
            body["model_version"],
            body["text"],
            response.headers.get("x-flywheel-memory", "off"),
        )

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, questions))


def rate(
    url: str, exchanges: list[Exchange], correction_share: float = 0.5, seed: int = 0
) -> Counter[str]:
    """Judge each answer and send the rating (and sometimes the reference as a correction)."""
    rng = random.Random(seed)
    counts: Counter[str] = Counter()
    with httpx.Client(timeout=30) as client:
        for exchange in exchanges:
            body = {"request_id": exchange.request_id, "rating": "up"}
            if not satisfied(exchange.question, exchange.text):
                body["rating"] = "down"
                if rng.random() < correction_share:
                    body["correction"] = exchange.question.reference
                    counts["corrections"] += 1
            client.post(f"{url}/feedback", json=body).raise_for_status()
            counts[body["rating"]] += 1
    return counts


def down_rate(exchanges: list[Exchange]) -> float:
    """The share of answers a simulated user would rate down (judged, nothing sent)."""
    if not exchanges:
        return 0.0
    return sum(not satisfied(e.question, e.text) for e in exchanges) / len(exchanges)
