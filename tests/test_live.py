"""The live evaluation set's rules, on plain data."""

from components.data.curated import feedback_corrections, held_out
from components.data.live import live_items
from components.inference_store import Answer
from components.memory.store import MemoryEntry

ENTRY = MemoryEntry(
    "mem-1",
    "Which port does MLflow use?",
    "Port 5077.",
    "label-studio",
    "r0",
    "1",
    "",
    1.0,
    "active",
)


def hit(rid: str, prompt: str, rating: str | None = None, correction: str | None = None) -> Answer:
    return Answer(
        rid,
        2.0,
        "1",
        "generate",
        prompt,
        ENTRY.answer,
        3,
        3,
        1.0,
        memory_entry=ENTRY.id,
        rating=rating,
        correction=correction,
    )


def test_the_split_is_by_request_and_stable() -> None:
    ids = [f"gen-{i}" for i in range(400)]
    first = [held_out(i, 0.5) for i in ids]
    assert first == [held_out(i, 0.5) for i in ids]  # the same on every rebuild
    assert 150 < sum(first) < 250
    assert sum(held_out(i, 0.2) for i in ids) < sum(first)


def test_rephrasings_come_from_hits_not_rated_down() -> None:
    answers = [hit(f"gen-{i}", f"mlflow port, version {i}?") for i in range(40)]
    answers.append(hit("gen-down", "what port is mlflow on?", rating="down"))
    answers.append(hit("gen-same", "which port does  MLflow use?"))  # the question itself
    items = live_items([ENTRY], answers, 0.5)
    assert [e.instruction for e in items.corrections] == [ENTRY.question]
    prompts = {e.instruction for e in items.held_out} | {i.prompt for i in items.trainable}
    assert len(prompts) == 40 and "what port is mlflow on?" not in prompts
    assert {held_out(i.request_id, 0.5) for i in items.trainable} == {False}
    assert all(e.output == ENTRY.answer for e in items.held_out)


def test_a_correction_on_a_held_out_rephrasing_is_not_trained_on() -> None:
    rid = next(f"gen-{i}" for i in range(100) if held_out(f"gen-{i}", 0.5))
    kept = next(f"gen-{i}" for i in range(100) if not held_out(f"gen-{i}", 0.5))
    answers = [
        hit(rid, "mlflow port?", rating="up", correction="Port 5077, as said."),
        hit(kept, "mlflow port please?", rating="up", correction="Port 5077, as said."),
        hit("gen-wrong", "mlflow port now?", rating="down", correction="It moved to 5078."),
    ]
    assert {i.request_id for i in feedback_corrections(answers, 0.5)} == {kept, "gen-wrong"}
