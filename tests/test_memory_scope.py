"""The correction memory's scope decision, with the real sentence-embedding model: corrections
in a family that differ in one word answer their own questions only, and the memory abstains,
saying why, on a sibling or a setting it was never taught."""

from __future__ import annotations

import pytest

from components.config import MemoryConfig
from components.memory.scope import names, phrases
from components.memory.store import CorrectionMemory

OFFICES = {"Berlin": "4417", "Lisbon": "2380", "Toronto": "9051"}


def question(office: str) -> str:
    return f"What is the phone extension of the payments on-call engineer at the {office} office?"


def correction(office: str) -> str:
    return (
        f"The payments on-call engineer at the {office} office is on extension {OFFICES[office]}."
    )


@pytest.fixture
def memory(home):
    memory = CorrectionMemory(MemoryConfig(trust="feedback"))
    for i, office in enumerate(OFFICES):
        memory.remember(question(office), correction(office), "feedback", f"r{i}", "1", f"c{i}")
    yield memory
    memory.close()


def test_names_are_capitalised_words_inside_a_sentence_and_numbers() -> None:
    assert names("Where does the Sydney office keep its backups? Ask Priya on floor 6.") == [
        "sydney",
        "priya",
        "6",
    ]
    assert names("What is the staging port?") == []  # a sentence's first word is no name
    assert "cancer care unit" in phrases("Does the cancer care unit open at 9?")


def test_each_sibling_answers_its_own_question_in_other_words(memory) -> None:
    for office in OFFICES:
        assert memory.recall(question(office)).entry.answer == correction(office)
        rephrased = (
            f"In the {office} office, which extension reaches whoever is on call for payments?"
        )
        found = memory.look_up(rephrased)
        assert found.recall is not None, (office, found.reason)
        assert found.recall.entry.answer == correction(office)


@pytest.mark.parametrize(
    "asked",
    [
        question("Madrid"),  # a sibling never taught
        "How do I descale an espresso machine?",
    ],
)
def test_the_memory_abstains_on_what_it_was_not_taught_and_says_why(memory, asked) -> None:
    found = memory.look_up(asked)
    assert found.recall is None, found.recall
    abstained = ("no correction fits", "two corrections compete", "the question does not name")
    assert found.reason.startswith((*abstained, "the question names")), found.reason


def test_each_entry_knows_its_family_and_what_tells_it_apart(memory) -> None:
    families = memory.families()
    by_answer = {e.answer: e for e in memory.served()}
    for office in OFFICES:
        entry = by_answer[correction(office)]
        assert "payments" in entry.about
        assert families[entry.id]["distinguishing"] == [office.lower()]
        assert len(families[entry.id]["siblings"]) == 2
    listed = memory.siblings_of(
        "The payments on-call engineer at the Madrid office answers on extension 5120."
    )
    assert all(correction(office) in listed for office in OFFICES)
    assert memory.siblings_of("Sourdough needs a long, cold proof.") == ""


def test_an_entry_an_older_release_wrote_is_completed_when_first_loaded(home) -> None:
    """A store from before entries recorded what they are about: the columns are added, and
    the entry is given its words and its correction's vector once, then served as any other."""
    import json

    from sqlalchemy import text

    from components.inference.schema import open_engine
    from components.model.embedding import sentence_embedder

    asked = question("Berlin")
    vector = sentence_embedder("all-minilm-l6-v2").embed([asked])[0]
    old = open_engine()
    with old.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE memory_entries (id VARCHAR(40) PRIMARY KEY, question TEXT, "
                "answer TEXT, key VARCHAR(64), source VARCHAR(16), request_id VARCHAR(64), "
                "model_version VARCHAR(128), client VARCHAR(64), accepted_at FLOAT, "
                "updated_at FLOAT, status VARCHAR(16), embedding TEXT)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO memory_entries VALUES ('mem-old', :q, :a, 'k', 'label-studio', "
                "'r0', '1', '', 1.0, 1.0, 'active', :e)"
            ),
            {"q": asked, "a": correction("Berlin"), "e": json.dumps(vector.tolist())},
        )
    old.dispose()
    memory = CorrectionMemory(MemoryConfig())
    try:
        assert memory.recall(asked).entry.id == "mem-old"
        (entry,) = memory.entries()
        assert {"berlin", "payments"} <= set(entry.about)
    finally:
        memory.close()


def test_phrase_vectors_keep_only_the_most_recently_used() -> None:
    import numpy as np

    from components.memory.scope import PhraseVectors

    class Counting:
        def __init__(self) -> None:
            self.embedded: list[str] = []

        def embed(self, texts: list[str]):
            self.embedded += texts
            return np.ones((len(texts), 4), dtype=np.float32)

    embedder = Counting()
    vectors = PhraseVectors(embedder, limit=3)
    vectors.of(["a", "b", "c"])
    vectors.of(["a", "d"])  # b, the least recently used, goes
    assert len(vectors._known) == 3 and "b" not in vectors._known
    vectors.of(["a", "c", "d"])
    assert embedder.embedded == ["a", "b", "c", "d"]  # nothing kept was embedded twice
