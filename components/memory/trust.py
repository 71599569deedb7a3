"""One trust policy for what users teach: what the memory serves and what is trained on.

The memory (`components/memory/store.py`) and curation (`components/data/curated.py`) both
ask this policy, so a correction the memory refuses is never curated for training either.
Each decision names the rule that made it:

- admitted: `reviewed` (approved or made in Label Studio), `agreement` (sent by
  `min_agreement` different clients, under `trust: feedback`);
- refused: `reviewed_only` (a `/feedback` correction under `trust: reviewed`), `empty`,
  `too_long` (over `max_correction_chars`), `profane` (toxic or profane by the offline
  classifier, at `max_profanity` or over), `rate_limited` (over
  `corrections_per_client_per_hour` for its client), `awaiting_agreement` (fewer clients than
  `min_agreement` sent it so far).

A client is a verified identity (`components/serving/auth.py`), so neither agreement nor
the rate can be bought with made-up headers.
"""

from __future__ import annotations

import hashlib
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass

from components.config import MemoryConfig
from components.content import profanity
from components.inference.records import Answer
from components.text import normalize_text, question_key, scrub_pii

RATE_WINDOW_S = 3600.0


@dataclass(frozen=True)
class Offer:
    """A correction someone sent (`source`: `feedback` or `label-studio`), normalised and
    PII-scrubbed as it would be stored."""

    question: str
    answer: str
    source: str
    client: str
    at: float

    @classmethod
    def of(
        cls,
        question: str,
        answer: str,
        source: str,
        client: str,
        at: float,
        pii: Counter[str] | None = None,
    ) -> Offer:
        """The offer as the policy judges it: the texts normalised and scrubbed (PII found
        is counted into `pii`)."""
        pii = Counter() if pii is None else pii
        return cls(
            scrub_pii(normalize_text(question), pii),
            scrub_pii(normalize_text(answer), pii),
            source,
            client,
            at,
        )

    @property
    def key(self) -> str:
        """Same question and same correction, whatever the spacing and case."""
        text = f"{question_key(self.question)}\n{question_key(self.answer)}"
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Decision:
    admitted: bool
    rule: str
    reason: str


REVIEWED = Decision(True, "reviewed", "approved or made by a reviewer")
REFUSED_FEEDBACK = Decision(
    False, "reviewed_only", "the memory trusts reviewed corrections only (memory.trust)"
)


class TrustPolicy:
    """The profile's `memory:` rules, as decisions."""

    def __init__(self, config: MemoryConfig) -> None:
        self.config = config

    def check(self, offer: Offer, sent_last_hour: int) -> Decision:
        """The rules one offer meets on its own: size, trust and its client's rate
        (`sent_last_hour`: the client's offers admitted so far in the last hour)."""
        config, answer = self.config, offer.answer
        if not offer.question or not answer:
            return Decision(False, "empty", "the question and the correction must not be empty")
        if len(answer) > config.max_correction_chars:
            return Decision(
                False,
                "too_long",
                f"the correction is {len(answer)} characters; the memory takes at most "
                f"{config.max_correction_chars}",
            )
        if config.max_profanity is not None:
            [score] = profanity([f"{offer.question}\n{answer}"])
            if score >= config.max_profanity:
                return Decision(
                    False,
                    "profane",
                    f"the correction reads as toxic or profane ({score:.2f}, "
                    f"memory.max_profanity is {config.max_profanity:g})",
                )
        if offer.source != "feedback":
            return REVIEWED
        if config.trust != "feedback":
            return REFUSED_FEEDBACK
        if sent_last_hour >= config.corrections_per_client_per_hour:
            return Decision(
                False,
                "rate_limited",
                f"this client sent {config.corrections_per_client_per_hour} corrections in "
                "the last hour; the memory takes no more from it for now",
            )
        return Decision(True, "checked", "within the size and rate limits")

    def agreed(self, source: str, clients: int) -> Decision:
        """Whether a checked correction, sent by `clients` different clients, is trusted."""
        if source != "feedback":
            return REVIEWED
        if self.config.trust != "feedback":
            return REFUSED_FEEDBACK
        if clients >= self.config.min_agreement:
            return Decision(True, "agreement", f"sent by {clients} different clients")
        return Decision(
            False,
            "awaiting_agreement",
            f"sent by {clients} of the {self.config.min_agreement} different clients needed",
        )

    def judge_feedback(self, answers: Sequence[Answer]) -> list[tuple[Answer, Decision]]:
        """Every `/feedback` correction among logged `answers`, with its decision: the one
        the memory took when it was sent (the same rules, over the same clients)."""
        sent = [a for a in answers if a.correction and a.correction.strip()]
        offers = [
            Offer.of(a.prompt, a.correction or "", "feedback", a.rated_by or "", a.rated_at or 0.0)
            for a in sent
        ]
        return list(zip(sent, self.judge(offers), strict=True))

    def judge(self, offers: Sequence[Offer]) -> list[Decision]:
        """Every offer's decision, taken in time order as the memory takes them one by one:
        each is checked against its client's admitted offers of the hour before it, then the
        checked ones of each key are counted by client."""
        order = sorted(range(len(offers)), key=lambda i: offers[i].at)
        recent: dict[str, deque[float]] = {}
        checked: dict[int, Decision] = {}
        for i in order:
            offer = offers[i]
            window = recent.setdefault(offer.client, deque())
            while window and window[0] <= offer.at - RATE_WINDOW_S:
                window.popleft()
            decision = self.check(offer, len(window))
            checked[i] = decision
            if decision.admitted and offer.source == "feedback":
                window.append(offer.at)
        clients: dict[str, set[str]] = {}
        for i, offer in enumerate(offers):
            if checked[i].admitted:
                clients.setdefault(offer.key, set()).add(offer.client)
        return [
            self.agreed(offer.source, len(clients[offer.key]))
            if checked[i].admitted
            else checked[i]
            for i, offer in enumerate(offers)
        ]


def tally(decisions: Sequence[Decision]) -> dict[str, dict[str, int]]:
    """How many offers each rule admitted and refused, for `/admin/memory` and model cards."""
    admitted = Counter(d.rule for d in decisions if d.admitted)
    refused = Counter(d.rule for d in decisions if not d.admitted)
    return {"admitted": dict(sorted(admitted.items())), "refused": dict(sorted(refused.items()))}
