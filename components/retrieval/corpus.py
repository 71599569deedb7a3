"""The documentation corpus as passages: Markdown and text files split at their headings, each
section packed into passages of at most `passage_chars` characters at paragraph boundaries."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from components.paths import REPO_ROOT, resolve_path

SUFFIXES = {".md", ".markdown", ".txt", ".rst"}
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Passage:
    source: str  # the file, relative to the repository when inside it
    title: str  # the headings above it, "Serving > The response cache"
    text: str


def corpus_files(paths: list[str]) -> list[Path]:
    """The Markdown and text files named, or found under the folders named, in order."""
    files: list[Path] = []
    for name in paths:
        path = resolve_path(name)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"retrieval.corpus: no file or folder {path}")
    return files


def display_name(path: Path) -> str:
    resolved = path.resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(path)


def sections(text: str) -> list[tuple[str, list[str]]]:
    """(heading path, paragraphs) per Markdown section; `#` lines in code fences are code."""
    headings: list[str] = []
    found: list[tuple[str, list[str]]] = [("", [])]
    paragraph: list[str] = []
    fenced = False

    def close_paragraph() -> None:
        if any(line.strip() for line in paragraph):
            found[-1][1].append("\n".join(paragraph).strip())
        paragraph.clear()

    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        heading = None if fenced else _HEADING.match(line)
        if heading:
            close_paragraph()
            level = len(heading[1])
            headings = [*headings[: level - 1], heading[2]]
            found.append((" > ".join(headings), []))
        elif not line.strip() and not fenced:
            close_paragraph()
        else:
            paragraph.append(line)
    close_paragraph()
    return [(title, paragraphs) for title, paragraphs in found if paragraphs]


def _chunks(words: list[str], limit: int) -> list[str]:
    """Words, a word longer than `limit` (a URL, a hash) cut into pieces that fit."""
    return [word[i : i + limit] for word in words for i in range(0, len(word), limit)]


def _pieces(paragraph: str, limit: int) -> list[str]:
    """A paragraph in pieces of at most `limit` characters, cut between sentences (or words)."""
    if len(paragraph) <= limit:
        return [paragraph]
    pieces: list[str] = []
    current = ""
    for unit in _SENTENCE_END.split(paragraph):
        words = [unit] if len(unit) <= limit else _chunks(unit.split(), limit)
        for word in words:
            if current and len(current) + 1 + len(word) > limit:
                pieces.append(current)
                current = ""
            current = f"{current} {word}".strip()
    return [*pieces, current] if current else pieces


def split_passages(text: str, source: str, max_chars: int) -> list[Passage]:
    """The file's sections, each packed into passages of at most `max_chars` characters."""
    passages: list[Passage] = []
    for title, paragraphs in sections(text):
        current: list[str] = []
        for piece in (p for paragraph in paragraphs for p in _pieces(paragraph, max_chars)):
            if current and sum(len(c) + 2 for c in current) + len(piece) > max_chars:
                passages.append(Passage(source, title, "\n\n".join(current)))
                current = []
            current.append(piece)
        if current:
            passages.append(Passage(source, title, "\n\n".join(current)))
    return passages


def load_passages(paths: list[str], max_chars: int) -> list[Passage]:
    """Every passage of the corpus, file by file."""
    return [
        passage
        for path in corpus_files(paths)
        for passage in split_passages(
            path.read_text(encoding="utf-8", errors="replace"), display_name(path), max_chars
        )
    ]
