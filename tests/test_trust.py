"""The one trust policy the memory and curation share (`components/memory/trust.py`)."""

from __future__ import annotations

from collections import Counter

from components.config import MemoryConfig
from components.memory.trust import Offer, TrustPolicy, tally

QUESTION = "Which badge opens the Harbor Street server room?"
RIGHT = "The Harbor Street server room opens with a blue level-3 badge."


def feedback(client: str, at: float, answer: str = RIGHT, question: str = QUESTION) -> Offer:
    return Offer.of(question, answer, "feedback", client, at)


def policy(**memory: object) -> TrustPolicy:
    return TrustPolicy(MemoryConfig.model_validate({"trust": "feedback", **memory}))


def test_agreement_counts_different_clients_and_one_client_never_agrees_with_itself() -> None:
    judged = policy(min_agreement=2).judge(
        [
            feedback("key:alice", 0.0),
            feedback("key:alice", 10.0, question=QUESTION.upper()),  # the same, shouted
            feedback("key:bob", 20.0, answer="A red badge."),
        ]
    )
    assert [d.rule for d in judged] == ["awaiting_agreement"] * 3
    agreed = policy(min_agreement=2).judge([feedback("key:alice", 0.0), feedback("key:bob", 5.0)])
    assert [(d.admitted, d.rule) for d in agreed] == [(True, "agreement")] * 2


def test_the_rate_is_a_sliding_hour_per_client_and_refused_offers_do_not_use_it() -> None:
    offers = [
        feedback("key:alice", 0.0, answer="x" * 50),  # too long: does not use the quota
        feedback("key:alice", 1.0, answer="one"),
        feedback("key:alice", 2.0, answer="two"),
        feedback("key:alice", 3.0, answer="three"),  # the third in the hour: refused
        feedback("key:bob", 4.0, answer="four"),  # another client has its own quota
        feedback("key:alice", 3601.5, answer="five"),  # the first one left the window
    ]
    judged = policy(max_correction_chars=40, corrections_per_client_per_hour=2).judge(offers)
    assert [d.rule for d in judged] == [
        "too_long",
        "agreement",
        "agreement",
        "rate_limited",
        "agreement",
        "agreement",
    ]
    assert "2 corrections in the last hour" in judged[3].reason


def test_order_is_by_time_not_by_position() -> None:
    later, earlier = feedback("key:alice", 50.0, answer="b"), feedback("key:alice", 1.0, "a")
    judged = policy(corrections_per_client_per_hour=1).judge([later, earlier])
    assert [d.rule for d in judged] == ["rate_limited", "agreement"]


def test_reviewed_only_refuses_feedback_and_reviews_pass_without_a_quota() -> None:
    reviewed = TrustPolicy(MemoryConfig(corrections_per_client_per_hour=1))
    offers = [
        feedback("key:alice", 0.0),
        Offer.of(QUESTION, RIGHT, "label-studio", "", 1.0),
        Offer.of("Another question?", "Another answer.", "label-studio", "", 2.0),
        Offer.of("   ", RIGHT, "label-studio", "", 3.0),
    ]
    judged = reviewed.judge(offers)
    assert [d.rule for d in judged] == ["reviewed_only", "reviewed", "reviewed", "empty"]
    assert tally(judged) == {
        "admitted": {"reviewed": 2},
        "refused": {"empty": 1, "reviewed_only": 1},
    }


def test_an_offer_is_judged_as_stored_normalised_and_scrubbed() -> None:
    pii: Counter[str] = Counter()
    offer = Offer.of(
        "  Who do I mail   about badges? ", "Mail ops@example.com.", "feedback", "c", 0.0, pii
    )
    assert offer.question == "Who do I mail   about badges?"  # trimmed
    assert "ops@example.com" not in offer.answer
    assert sum(pii.values()) == 1
    same = Offer.of("who do i mail about BADGES?", offer.answer, "feedback", "d", 9.0)
    assert offer.key == same.key  # whatever the spacing and case


def test_curation_applies_the_size_rule_to_reviews_too_and_records_the_rule(tmp_path) -> None:
    from components.data.curated import CuratedItem, write_curated
    from components.records import read_jsonl

    items = [
        CuratedItem("r1", QUESTION, RIGHT, "label-studio", "correct", "1", "reviewed"),
        CuratedItem("r2", "A long one?", "y" * 500, "label-studio", "correct", "1", "reviewed"),
        CuratedItem("r3", "Agreed?", "Yes, agreed.", "feedback", "correction", "1", "agreement"),
    ]
    policy = TrustPolicy(MemoryConfig(trust="feedback", max_correction_chars=100))
    result = write_curated(items, tmp_path, [], 8, policy)
    assert (result.written, result.skipped) == (2, {"too_long": 1})
    rows = read_jsonl(tmp_path / "0001-feedback-label-studio.jsonl")
    assert [(r["request_id"], r["rule"]) for r in rows] == [("r1", "reviewed"), ("r3", "agreement")]


def test_a_toxic_correction_is_refused_by_the_content_rule_and_a_blunt_one_is_not() -> None:
    offers = [
        feedback("key:alice", 0.0, answer="Whoever asks this is a fucking moron."),
        feedback("key:bob", 1.0, answer="Kill the stuck worker's process, then restart it."),
    ]
    judged = policy().judge(offers)
    assert [d.rule for d in judged] == ["profane", "agreement"]
    assert "memory.max_profanity" in judged[0].reason
    assert [d.rule for d in policy(max_profanity=None).judge(offers)] == ["agreement"] * 2
