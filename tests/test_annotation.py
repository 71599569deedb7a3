"""The Label Studio round trip against a real server: push bad answers, annotate them through
the API as a reviewer would, pull, and check the curated file."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.inference.records import InferenceRecord
from components.inference.store import InferenceStore
from components.records import read_jsonl
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
TEST_PROMPT = read_jsonl(REPO / "data/seed/test.jsonl")[0]["instruction"]


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    """A real Label Studio server with a fresh data folder, started as `make labelstudio` does."""
    from scripts import label_studio_server as server

    home = tmp_path_factory.mktemp("ls-home")
    port = free_port()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLYWHEEL_HOME", str(home))
        patch.delenv("LABEL_STUDIO_API_KEY", raising=False)
        patch.setenv("LABEL_STUDIO_URL", f"http://127.0.0.1:{port}")
        process = server.start(port, home / "labelstudio.log")
        try:
            process.wait_ready(timeout=240)
            yield home
        finally:
            process.stop()


def log_answers(home: Path) -> None:
    store = InferenceStore(f"sqlite:///{home / 'feedback.db'}")
    rows = [
        ("down-approved", "How do I start the worker?", "Run prefect worker start.", 0.8),
        ("down-fixed", "Mail me at ana@example.com about ports", "Port 80.", 0.7),
        ("low-corrected", "Which port does the service use?", "Maybe 8000.", 0.12),
        ("down-rejected", "Tell me a joke", "No.", 0.9),
        ("down-cancelled", "What is LoRA?", "A radio.", 0.9),
        ("down-test-prompt", TEST_PROMPT, "I do not know.", 0.9),
        ("fine", "What is Flywheel?", "An MLOps loop.", 0.95),
    ]
    for i, (rid, prompt, answer, confidence) in enumerate(rows):
        store.log(
            InferenceRecord(rid, 1e9 + i, "1", "generate", prompt, answer, 5, 5, 9.0, confidence)
        )
    for rid in ("down-approved", "down-rejected", "down-cancelled", "down-test-prompt"):
        store.add_feedback(rid, "down")
    store.add_feedback("down-fixed", "down", correction="The service listens on port 3000.")
    store.add_feedback("fine", "up")
    store.close()


def annotate(project, request_id: str, verdict: str | None, correction: str | None = None):
    task = next(t for t in project.tasks() if t["data"]["request_id"] == request_id)
    result = []
    if verdict:
        result.append(
            {
                "from_name": "verdict",
                "to_name": "answer",
                "type": "choices",
                "value": {"choices": [verdict]},
            }
        )
    if correction:
        result.append(
            {
                "from_name": "correction",
                "to_name": "answer",
                "type": "textarea",
                "value": {"text": [correction]},
            }
        )
    project.client.annotations.create(id=task["id"], result=result, was_cancelled=not verdict)


@pytest.mark.e2e
@pytest.mark.slow
def test_review_round_trip_through_label_studio(
    label_studio, prefect_server, tmp_path, monkeypatch
):
    from components.annotate.review import ReviewProject
    from flows.annotation_sync import annotation_sync

    monkeypatch.setenv("FLYWHEEL_CURATED_DIR", str(tmp_path / "curated"))
    # Users' own corrections are trained on only when the profile trusts them.
    monkeypatch.setenv("FLYWHEEL_SET", "memory.trust=feedback")
    log_answers(label_studio)

    first = annotation_sync(profile="tiny", lookback_days=1e5)
    assert first["pushed"] == 6  # five thumbs-down and one low-confidence answer; not "fine"
    assert first["verdicts"] == {}
    # The user's correction arrives before any review; the PII in its prompt is scrubbed.
    assert first["curated"]["written"] == 1

    project = ReviewProject.connect("Flywheel answer review")
    tasks = {t["data"]["request_id"]: t for t in project.tasks()}
    assert set(tasks) == {
        "down-approved",
        "down-fixed",
        "low-corrected",
        "down-rejected",
        "down-cancelled",
        "down-test-prompt",
    }
    prefilled = tasks["low-corrected"]["predictions"][0]["result"][0]["value"]["text"]
    assert prefilled == ["Maybe 8000."]
    assert "low confidence 0.12" in tasks["low-corrected"]["data"]["reason"]

    annotate(project, "down-approved", "approve")
    annotate(project, "low-corrected", "correct", "The service uses port 3000 by default.")
    annotate(project, "down-rejected", "reject")
    annotate(project, "down-cancelled", None)
    annotate(project, "down-test-prompt", "correct", "The interval shows the spread.")

    second = annotation_sync(profile="tiny", lookback_days=1e5)
    assert second["pushed"] == 0  # nothing is pushed twice
    assert second["verdicts"] == {"approve": 1, "correct": 2, "reject": 1, "cancelled": 1}
    assert second["curated"]["written"] == 2
    assert second["curated"]["skipped"] == {"duplicate": 1, "overlaps_test_split": 1}

    files = sorted((tmp_path / "curated").glob("*.jsonl"))
    assert [f.name for f in files] == ["0001-feedback.jsonl", "0002-label-studio.jsonl"]
    rows = {r["request_id"]: r for f in files for r in read_jsonl(f)}
    assert set(rows) == {"down-fixed", "down-approved", "low-corrected"}
    assert rows["down-fixed"]["output"] == "The service listens on port 3000."
    assert "ana@example.com" not in rows["down-fixed"]["instruction"]
    assert rows["down-approved"]["output"] == "Run prefect worker start."
    assert rows["low-corrected"]["output"] == "The service uses port 3000 by default."
    assert rows["low-corrected"]["verdict"] == "correct"

    third = annotation_sync(profile="tiny", lookback_days=1e5)
    assert third["curated"]["written"] == 0 and third["curated"]["path"] is None
    assert len(list((tmp_path / "curated").glob("*.jsonl"))) == 2


def test_curated_examples_are_ingested_as_feedback(tmp_path, monkeypatch):
    from components.config import MemoryConfig, SourceConfig
    from components.data.curated import CuratedItem, write_curated
    from components.data.ingest import ingest
    from components.memory.trust import TrustPolicy

    folder = tmp_path / "curated"
    item = CuratedItem(
        "r1", "How do I restart the worker?", "Run it again.", "feedback", "correction"
    )
    write_curated([item], folder, [], 10, TrustPolicy(MemoryConfig(trust="feedback")))
    result = ingest([SourceConfig(path="data/seed/tickets.jsonl")], tmp_path / "out", str(folder))
    assert result.from_feedback == 1
