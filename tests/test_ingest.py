import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.config import SourceConfig
from components.data.ingest import NoValidRecords, detect_format, ingest, to_example
from components.records import load_examples, read_jsonl

ALPACA = {"instruction": "How do I run the tests?", "input": "", "output": "Run make test."}


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_every_format_and_schema_maps_to_one_schema(tmp_path: Path) -> None:
    from datasets import Dataset

    _jsonl(tmp_path / "a.jsonl", [ALPACA])
    with (tmp_path / "b.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prompt", "completion"])
        writer.writerow(["What is the champion alias?", "The version being served."])
    rows = [{"prompt": "What is QLoRA?", "response": "LoRA on 4-bit."}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "What is drift?"},
                    {"role": "assistant", "content": "Live prompts unlike training prompts."},
                ]
            }
        ]
    ).save_to_disk(str(tmp_path / "d_hf"))
    feedback = tmp_path / "curated"
    feedback.mkdir()
    _jsonl(
        feedback / "0001-feedback.jsonl", [{"instruction": "Fix 503?", "output": "Retry later."}]
    )
    # Only curated version files are training data; a live evaluation set beside them is not.
    _jsonl(feedback / "live-abc.jsonl", [{"instruction": "Held out?", "output": "Never trained."}])

    sources = [
        SourceConfig(path=str(tmp_path / n)) for n in ("a.jsonl", "b.csv", "c.parquet", "d_hf")
    ]
    result = ingest(sources, tmp_path / "out", feedback_dir=str(feedback))

    assert result.valid == 5 and result.quarantined == 0
    assert result.from_feedback == 1
    examples = load_examples(Path(result.examples_path))
    assert [e.instruction for e in examples] == [
        "How do I run the tests?",
        "What is the champion alias?",
        "What is QLoRA?",
        "What is drift?",
        "Fix 503?",
    ]
    assert examples[3].system == "Be brief."
    assert examples[2].output == "LoRA on 4-bit."
    assert examples[4].origin == "feedback"


def test_bad_records_are_quarantined_with_reasons(tmp_path: Path) -> None:
    source = _jsonl(
        tmp_path / "mixed.jsonl",
        [
            ALPACA,
            "{not json",
            {"instruction": "no answer"},
            {"instruction": 42, "output": "x"},
            {"question": "?", "answer": "!"},
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            {"instruction": "   ", "output": "blank instruction"},
            ["a", "list"],
        ],
    )
    result = ingest([SourceConfig(path=str(source))], tmp_path / "out")

    assert result.valid == 1 and result.quarantined == 7
    assert result.per_source[str(source)] == {"valid": 1, "quarantined": 7}
    reasons = [row["reason"] for row in read_jsonl(Path(result.quarantine_path))]
    assert reasons[0].startswith("invalid JSON")
    assert "missing field 'output'" in reasons[1]
    assert "field 'instruction' must be a string, got int" in reasons[2]
    assert "unknown schema" in reasons[3] and "answer, question" in reasons[3]
    assert "roles user, user" in reasons[4]
    assert "field 'instruction' is empty" in reasons[5]
    assert "must be an object" in reasons[6]
    locations = [row["location"] for row in read_jsonl(Path(result.quarantine_path))]
    assert locations[0] == "mixed.jsonl:2"


def test_nothing_valid_fails_with_a_clear_message(tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "bad.jsonl", [{"foo": 1}, {"bar": 2}])
    with pytest.raises(NoValidRecords, match="all 2 records were quarantined"):
        ingest([SourceConfig(path=str(source))], tmp_path / "out")
    assert len(read_jsonl(tmp_path / "out" / "quarantine.jsonl")) == 2


def test_missing_source_and_unknown_format_are_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="source not found"):
        ingest([SourceConfig(path=str(tmp_path / "nope.jsonl"))], tmp_path / "out")
    odd = tmp_path / "data.xlsx"
    odd.write_text("")
    with pytest.raises(ValueError, match="set `format:`"):
        detect_format(odd)


def test_content_hash_is_stable_and_tracks_content(tmp_path: Path) -> None:
    a = _jsonl(tmp_path / "a.jsonl", [ALPACA])
    first = ingest([SourceConfig(path=str(a))], tmp_path / "o1").content_hash
    again = ingest([SourceConfig(path=str(a))], tmp_path / "o2").content_hash
    b = _jsonl(tmp_path / "b.jsonl", [{**ALPACA, "output": "Run make test, then read it."}])
    other = ingest([SourceConfig(path=str(b))], tmp_path / "o3").content_hash
    assert first == again != other


def test_nan_from_csv_counts_as_missing() -> None:
    with pytest.raises(ValueError, match="missing field 'completion'"):
        to_example({"prompt": "hi", "completion": float("nan")}, source="x.csv")
