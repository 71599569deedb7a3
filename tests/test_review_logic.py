"""Label Studio review logic without a server: parsing annotations, choosing what to review."""

from components.annotate.review import curated_items, parse_review, review_candidates
from components.inference.records import Answer


def task(result: list[dict], cancelled: bool = False, older: list[dict] | None = None) -> dict:
    annotations = [{"id": 1, "result": older or [], "was_cancelled": False, "created_at": "1"}]
    annotations.append({"id": 2, "result": result, "was_cancelled": cancelled, "created_at": "2"})
    data = {"request_id": "r1", "prompt": "Which port?", "answer": "80", "model_version": "3"}
    return {"id": 7, "data": data, "annotations": annotations}


def verdict(choice: str) -> dict:
    return {"from_name": "verdict", "type": "choices", "value": {"choices": [choice]}}


def correction(text: str) -> dict:
    return {"from_name": "correction", "type": "textarea", "value": {"text": ["draft", text]}}


def test_the_latest_annotation_decides_and_its_last_text_is_the_correction() -> None:
    review = parse_review(task([verdict("correct"), correction(" Port 3000. ")], older=[]))
    assert review is not None
    assert (review.verdict, review.correction, review.model_version) == (
        "correct",
        "Port 3000.",
        "3",
    )
    assert parse_review({"id": 1, "data": {}, "annotations": []}) is None


def test_cancelled_and_unchanged_reviews_are_counted_but_not_used() -> None:
    reviews = [
        parse_review(task([verdict("correct"), correction("80")])),  # "corrected" to the same
        parse_review(task([verdict("approve")], cancelled=True)),
        parse_review(task([verdict("approve")])),
        parse_review(task([])),  # submitted without a choice: a rejection
    ]
    items, counts = curated_items([r for r in reviews if r is not None])
    assert counts == {"correct_without_change": 1, "cancelled": 1, "approve": 1, "reject": 1}
    assert [(i.answer, i.verdict, i.source) for i in items] == [("80", "approve", "label-studio")]


def answer(rid: str, rating: str | None, confidence: float | None) -> Answer:
    return Answer(rid, 1.0, "1", "generate", "q", "a", 1, 1, 1.0, confidence, rating=rating)


def test_thumbs_down_and_low_confidence_answers_go_to_review() -> None:
    answers = [
        answer("down", "down", 0.9),
        answer("unsure", None, 0.1),
        answer("fine", "up", 0.95),
        answer("unknown", None, None),
    ]
    picked = {a.request_id: reason for a, reason in review_candidates(answers, 0.3)}
    assert set(picked) == {"down", "unsure"}
    assert "low confidence 0.10" in picked["unsure"]


def test_a_corrections_review_shows_the_siblings_the_memory_serves() -> None:
    from dataclasses import replace

    corrected = replace(answer("fix", "down", 0.9), correction="Port 4000 on staging.")
    served = {"Port 4000 on staging.": "Port 5000 on production. (told apart by: production)"}
    picked = review_candidates([corrected], 0.3, lambda c: served.get(c, ""))
    ((_, reason),) = picked
    assert "the user's correction: Port 4000 on staging." in reason
    assert "the memory already serves its siblings: Port 5000 on production." in reason
    alone = review_candidates([corrected], 0.3, lambda c: "")
    assert "siblings" not in alone[0][1]
