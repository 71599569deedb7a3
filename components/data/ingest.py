"""Ingest: read every source, map it to `Example`, quarantine what does not validate.

Supported schemas, detected per record:
- alpaca: `instruction`, optional `input`, `output`
- prompt/completion: `prompt` and `completion` (or `response`)
- chat: `messages`, a list of {role, content} with one user turn followed by the assistant turn
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.config import SourceConfig
from components.paths import resolve_path
from components.records import Example, content_hash, iter_jsonl, save_examples, write_jsonl

VERSION_FILE = re.compile(r"^(\d{4})-[\w-]+\.jsonl$")  # a curated version file


class InvalidRecord(ValueError):
    """A record that cannot become an `Example`; the message is the quarantine reason."""


class NoValidRecords(RuntimeError):
    """Raised when ingest ends with nothing valid to train on."""


@dataclass(frozen=True)
class RawRecord:
    value: Any
    location: str


@dataclass
class IngestResult:
    """What ingest produced: the valid examples' file, the quarantine and the counts."""

    examples_path: str
    quarantine_path: str
    valid: int
    quarantined: int
    per_source: dict[str, dict[str, int]] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    from_feedback: int = 0
    content_hash: str = ""


def detect_format(path: Path) -> str:
    """Guess a source format from a path."""
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return "hf_disk"
        return "feedback"
    suffix = path.suffix.lower()
    if suffix in {".jsonl", ".json", ".ndjson"}:
        return "jsonl"
    if suffix in {".csv", ".parquet"}:
        return suffix[1:]
    raise InvalidRecord(f"cannot tell the format of {path}; set `format:` for this source")


def _read_jsonl(path: Path) -> Iterator[RawRecord]:
    for number, line in iter_jsonl(path):
        location = f"{path.name}:{number}"
        try:
            yield RawRecord(json.loads(line), location)
        except json.JSONDecodeError as exc:
            yield RawRecord(
                InvalidRecord(f"invalid JSON: {exc.msg} at column {exc.colno}"), location
            )


def _read_csv(path: Path) -> Iterator[RawRecord]:
    with path.open(newline="", encoding="utf-8", errors="replace") as fh:
        for number, row in enumerate(csv.DictReader(fh), start=2):
            yield RawRecord(row, f"{path.name}:{number}")


def _read_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    for number, row in enumerate(pq.read_table(path).to_pylist()):
        yield RawRecord(row, f"{path.name}[{number}]")


def _read_hf(dataset: Any, label: str) -> Iterator[RawRecord]:
    for number, row in enumerate(dataset):
        yield RawRecord(row, f"{label}[{number}]")


def read_source(source: SourceConfig) -> Iterator[RawRecord]:
    """Yield the raw records of one source, in order, with where each came from."""
    if source.format == "hf_hub":
        from datasets import load_dataset

        yield from _read_hf(load_dataset(source.path, split=source.split), source.path)
        return
    path = resolve_path(source.path)
    if not path.exists():
        raise FileNotFoundError(f"source not found: {path}")
    fmt = detect_format(path) if source.format == "auto" else source.format
    if fmt == "jsonl":
        yield from _read_jsonl(path)
    elif fmt == "csv":
        yield from _read_csv(path)
    elif fmt == "parquet":
        yield from _read_parquet(path)
    elif fmt == "hf_disk":
        from datasets import DatasetDict, load_from_disk

        dataset = load_from_disk(str(path))
        if isinstance(dataset, DatasetDict):
            dataset = dataset[source.split]
        yield from _read_hf(dataset, path.name)
    elif fmt == "feedback":  # the curated version files only (the live set beside them is not)
        for file in curated_versions(path):
            yield from _read_jsonl(file)


def curated_versions(folder: Path) -> list[Path]:
    """The curated folder's version files (`NNNN-<source>.jsonl`), oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if VERSION_FILE.match(p.name))


def load_frozen_test(path: str) -> list[Example]:
    """Read the frozen test split; any invalid record there is an error, not a quarantine."""
    return [
        to_example(raw.value, source=path, origin="test")
        for raw in read_source(SourceConfig(path=path))
    ]


def _text(record: dict, name: str, required: bool = True) -> str:
    value = record.get(name)
    if value is None or (isinstance(value, float) and value != value):  # None or NaN from CSV
        if required:
            raise InvalidRecord(f"missing field '{name}'")
        return ""
    if not isinstance(value, str):
        raise InvalidRecord(f"field '{name}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise InvalidRecord(f"field '{name}' is empty")
    return value


def _from_messages(messages: Any) -> dict[str, str]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRecord("field 'messages' must be a non-empty list")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise InvalidRecord(f"messages[{i}] must be an object with a string 'content'")
        turns.append((message.get("role"), message["content"]))
    system = ""
    if turns[0][0] == "system":
        system = turns.pop(0)[1]
    roles = [role for role, _ in turns]
    if roles != ["user", "assistant"]:
        raise InvalidRecord(
            "messages must be [system?, user, assistant]; got roles " + ", ".join(map(str, roles))
        )
    if not turns[0][1].strip() or not turns[1][1].strip():
        raise InvalidRecord("user and assistant messages must not be empty")
    return {"system": system, "instruction": turns[0][1], "input": "", "output": turns[1][1]}


def to_example(value: Any, source: str, origin: str = "seed") -> Example:
    """Map one raw record of any supported schema to an `Example`, or raise `InvalidRecord`."""
    if isinstance(value, InvalidRecord):
        raise value
    if not isinstance(value, dict):
        raise InvalidRecord(f"record must be an object, got {type(value).__name__}")
    if "messages" in value:
        fields = _from_messages(value["messages"])
    elif "instruction" in value:
        fields = {
            "instruction": _text(value, "instruction"),
            "input": _text(value, "input", required=False),
            "output": _text(value, "output"),
        }
    elif "prompt" in value:
        answer = "completion" if "completion" in value else "response"
        fields = {"instruction": _text(value, "prompt"), "output": _text(value, answer)}
    else:
        keys = ", ".join(sorted(map(str, value))) or "none"
        raise InvalidRecord(
            "unknown schema: expected instruction/output, prompt/completion or messages "
            f"(got keys: {keys})"
        )
    return Example(source=source, origin=origin, **fields)


def _json_safe(value: Any) -> Any:
    if isinstance(value, InvalidRecord):
        return None
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def ingest(
    sources: list[SourceConfig], out_dir: Path, feedback_dir: str | None = None
) -> IngestResult:
    """Read all sources into `examples.jsonl`; invalid records go to `quarantine.jsonl`."""
    all_sources = list(sources)
    if feedback_dir and resolve_path(feedback_dir).is_dir():
        all_sources.append(SourceConfig(path=feedback_dir, format="feedback"))
    examples: list[Example] = []
    quarantine: list[dict] = []
    per_source: dict[str, dict[str, int]] = {}
    reasons: Counter[str] = Counter()
    for source in all_sources:
        origin = "feedback" if source.format == "feedback" else "seed"
        counts = per_source.setdefault(source.path, {"valid": 0, "quarantined": 0})
        for raw in read_source(source):
            try:
                examples.append(to_example(raw.value, source=source.path, origin=origin))
                counts["valid"] += 1
            except InvalidRecord as exc:
                counts["quarantined"] += 1
                reasons[str(exc).split(":")[0]] += 1
                quarantine.append(
                    {
                        "source": source.path,
                        "location": raw.location,
                        "reason": str(exc),
                        "record": _json_safe(raw.value),
                    }
                )
    out_dir.mkdir(parents=True, exist_ok=True)
    examples_path = out_dir / "examples.jsonl"
    quarantine_path = out_dir / "quarantine.jsonl"
    save_examples(examples_path, examples)
    write_jsonl(quarantine_path, quarantine)
    if not examples:
        raise NoValidRecords(
            f"no valid records left after ingest: all {len(quarantine)} records were "
            f"quarantined; reasons are in {quarantine_path}"
        )
    return IngestResult(
        examples_path=str(examples_path),
        quarantine_path=str(quarantine_path),
        valid=len(examples),
        quarantined=len(quarantine),
        per_source=per_source,
        reasons=dict(reasons),
        from_feedback=sum(1 for e in examples if e.origin == "feedback"),
        content_hash=content_hash(examples),
    )
