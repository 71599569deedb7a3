"""The live evaluation set's rules, on plain data."""

from pathlib import Path

from components.config import MemoryConfig
from components.data.curated import feedback_corrections, held_out
from components.data.live import LiveSet, live_items, with_variants
from components.inference.records import Answer
from components.memory.store import MemoryEntry
from components.memory.trust import TrustPolicy

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
    judged = TrustPolicy(MemoryConfig(trust="feedback")).judge_feedback(answers)
    assert {i.request_id for i in feedback_corrections(judged, 0.5)} == {kept, "gen-wrong"}


def test_the_recipes_held_out_rewrites_join_the_live_set_under_a_new_hash(
    tmp_path, monkeypatch
) -> None:
    from components.config import load_profile
    from components.records import Example, load_examples, save_examples

    monkeypatch.setenv("FLYWHEEL_CURATED_DIR", str(tmp_path))
    config = load_profile("tiny")
    correction = Example(ENTRY.question, ENTRY.answer, origin="live")
    path = tmp_path / "live" / "live-first.jsonl"
    save_examples(path, [correction])
    live = LiveSet(str(path), "first", 1, 0, 0)
    variant = Example("MLflow port?", ENTRY.answer, origin="variant")

    assert with_variants(config, live, []) is live
    extended = with_variants(config, live, [variant])
    assert extended.size == 2 and extended.variants == 1 and extended.content_hash != "first"
    assert load_examples(Path(extended.path)) == [correction, variant]
    assert load_examples(path) == [correction]  # the built live set is left as it was
    assert with_variants(config, live, [variant]) == extended  # same content, same file
