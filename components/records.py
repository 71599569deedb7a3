"""The one internal record schema every source is mapped to, and its JSONL storage."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Example:
    """One instruction-tuning example: a user turn (instruction + optional input) and an answer."""

    instruction: str
    output: str
    input: str = ""
    system: str = ""
    source: str = ""
    origin: str = "seed"

    def prompt(self) -> str:
        """The user message as the model sees it."""
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction

    def messages(self, with_answer: bool = True) -> list[dict[str, str]]:
        """The chat messages for the tokenizer's chat template."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs.append({"role": "user", "content": self.prompt()})
        if with_answer:
            msgs.append({"role": "assistant", "content": self.output})
        return msgs

    def key(self) -> str:
        """A stable id from the content (not the source), used for splits and dedup."""
        text = "\x1f".join([self.system, self.instruction, self.input, self.output])
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    """Write dicts as JSON lines; returns the count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            n += 1
    return n


def save_examples(path: Path, examples: Iterable[Example]) -> int:
    return write_jsonl(path, (asdict(e) for e in examples))


def read_jsonl(path: Path) -> list[dict]:
    """All records of a JSONL file written by `write_jsonl`."""
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_examples(path: Path) -> list[Example]:
    return [Example(**row) for row in read_jsonl(path)]


def iter_jsonl(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (line number, raw line) for non-blank lines; parsing is the caller's business."""
    with path.open(encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip():
                yield number, line


def content_hash(examples: Iterable[Example]) -> str:
    """SHA-256 over the examples' content, in order: the dataset's identity for lineage."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(example.key().encode())
    return digest.hexdigest()
