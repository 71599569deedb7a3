"""Retire memory entries the champion has learned, so the memory stays small and the weights
carry the knowledge.

After a promotion, the deploy flow asks the newly served champion each active entry's
question with the memory off (greedy). An entry retires when the answer states its fact: every
word the correction adds to the question (numbers, names, the new terms; a few function words
aside) appears in the answer. The rule errs on the side of keeping an entry: a near miss such
as another port number or a dropped name keeps it served. Retired entries stay in the table
for the record and are never served again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx

from components.config import MemoryConfig
from components.memory.store import CorrectionMemory
from components.text import FUNCTION_WORDS, word_list

MEMORY_OFF = {"x-flywheel-memory": "off"}


def fact_words(question: str, correction: str) -> set[str]:
    """The words of the correction that the question does not already hold."""
    asked = set(word_list(question))
    return {w for w in word_list(correction) if w not in asked and w not in FUNCTION_WORDS}


def states_fact(question: str, correction: str, answer: str) -> bool:
    """Whether `answer` states what `correction` says about `question`."""
    needed = fact_words(question, correction)
    return bool(needed) and needed <= set(word_list(answer))


@dataclass
class Retirement:
    version: str
    checked: int = 0
    retired: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def retire_learned(
    config: MemoryConfig, client: httpx.Client, version: str, max_new_tokens: int = 64
) -> Retirement:
    """Ask the service behind `client` (memory off) each active entry's question; retire
    the entries whose fact the answer of `version` states."""
    outcome = Retirement(version)
    if not config.enabled:
        return outcome
    memory = CorrectionMemory(config)
    try:
        for entry in memory.entries("active"):
            outcome.checked += 1
            response = client.post(
                "/generate",
                json={"prompt": entry.question, "max_new_tokens": max_new_tokens},
                headers=MEMORY_OFF,
            )
            if response.status_code != 200:
                outcome.errors.append(f"{entry.id}: {response.status_code}")
                continue
            answered_by = response.headers.get("x-model-version")
            if answered_by != version:  # a swap in between: judge nothing on another model
                outcome.errors.append(f"{entry.id}: answered by v{answered_by}")
                continue
            if states_fact(entry.question, entry.answer, response.json()["text"]):
                memory.set_status(entry.id, "retired")
                outcome.retired.append(entry.id)
            else:
                outcome.kept.append(entry.id)
    finally:
        memory.close()
    return outcome
