"""Curated examples: answers people reviewed (Label Studio) or corrected (`/feedback`).

Each sync that finds something new writes one more version file, `NNNN-<source>.jsonl`, into
the curated folder (`data.feedback_dir` of the profile, `$FLYWHEEL_HOME/curated` by default;
`FLYWHEEL_CURATED_DIR` overrides both). Files are never rewritten, so every training run's
data can be traced back to the versions it read. Before writing, each example is normalised,
PII-scrubbed, dropped if it repeats a request or an example already curated, and dropped if
its prompt overlaps the frozen test split, so feedback can never leak the test set into
training. The training pipeline ingests the folder and counts these examples as feedback.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from components.config import PipelineConfig
from components.data.ingest import curated_versions, load_frozen_test
from components.inference.records import Answer
from components.inference.store import InferenceStore
from components.paths import curated_dir
from components.records import Example, read_jsonl, write_jsonl
from components.text import Decontaminator, normalize_text, scrub_pii


class Asked(Protocol):
    """A logged question: an answer from the inference log, or a review of one."""

    @property
    def request_id(self) -> str: ...
    @property
    def prompt(self) -> str: ...
    @property
    def model_version(self) -> str: ...


@dataclass(frozen=True)
class CuratedItem:
    """One answer a person approved, or the answer they wrote instead."""

    request_id: str
    prompt: str
    answer: str
    source: str  # "label-studio", "feedback" or "rephrasing"
    verdict: str  # "approve", "correct", "correction" or "memory-hit"
    model_version: str = ""

    @classmethod
    def answering(cls, asked: Asked, answer: str, source: str, verdict: str) -> CuratedItem:
        """`answer` to the logged question `asked`."""
        return cls(asked.request_id, asked.prompt, answer, source, verdict, asked.model_version)


@dataclass
class CurationResult:
    path: str | None
    written: int
    skipped: dict[str, int] = field(default_factory=dict)
    pii: dict[str, int] = field(default_factory=dict)


def held_out(request_id: str, fraction: float) -> bool:
    """Whether a live rephrasing is held out (never trained on): decided by the request, so
    the same request always lands on the same side, across every rebuild and retrain."""
    digest = int(hashlib.sha256(request_id.encode()).hexdigest()[:8], 16)
    return digest / 0xFFFFFFFF < fraction


def is_held_out_rephrasing(answer: Answer, fraction: float) -> bool:
    """A memory answer not rated down whose request falls on the held-out side."""
    return (
        bool(answer.memory_entry)
        and answer.rating != "down"
        and held_out(answer.request_id, fraction)
    )


def feedback_corrections(answers: Iterable[Answer], holdout_fraction: float) -> list[CuratedItem]:
    """Corrections users sent with `/feedback`: the answer they say was right (never one on a
    held-out live rephrasing, which only ever judges)."""
    return [
        CuratedItem.answering(a, a.correction, "feedback", "correction")
        for a in answers
        if a.correction and a.correction.strip() and not is_held_out_rephrasing(a, holdout_fraction)
    ]


def write_curated(
    items: Iterable[CuratedItem], folder: Path, test: list[Example], decontam_ngram: int
) -> CurationResult:
    """Write the new, clean items as the next version file; returns what was kept and why not."""
    curated = [r for p in curated_versions(folder) for r in read_jsonl(p)]
    seen_requests = {str(r.get("request_id")) for r in curated}
    seen_keys = {Example(instruction=r["instruction"], output=r["output"]).key() for r in curated}
    contaminated = Decontaminator(test, decontam_ngram)
    skipped: Counter[str] = Counter()
    pii: Counter[str] = Counter()
    rows = []
    for item in items:
        prompt = scrub_pii(normalize_text(item.prompt), pii)
        answer = scrub_pii(normalize_text(item.answer), pii)
        example = Example(instruction=prompt, output=answer)
        if not prompt or not answer:
            skipped["empty"] += 1
        elif item.request_id in seen_requests or example.key() in seen_keys:
            skipped["duplicate"] += 1
        elif contaminated(example):
            skipped["overlaps_test_split"] += 1
        else:
            seen_requests.add(item.request_id)
            seen_keys.add(example.key())
            rows.append(
                {
                    "instruction": prompt,
                    "output": answer,
                    "request_id": item.request_id,
                    "source": item.source,
                    "verdict": item.verdict,
                    "model_version": item.model_version,
                }
            )
    if not rows:
        return CurationResult(None, 0, dict(skipped), dict(pii))
    versions = curated_versions(folder)
    number = int(versions[-1].name[:4]) + 1 if versions else 1
    source = "-".join(sorted({r["source"] for r in rows}))
    path = folder / f"{number:04d}-{source}.jsonl"
    write_jsonl(path, rows)
    return CurationResult(str(path), len(rows), dict(skipped), dict(pii))


def summary(folder: Path) -> dict[str, int]:
    """Examples per version file, for reports."""
    return {p.name: len(read_jsonl(p)) for p in curated_versions(folder)}


def curate(config: PipelineConfig, items: Iterable[CuratedItem]) -> CurationResult:
    """Write the items as the profile's next curated version (deduplicated, scrubbed, test-safe)."""
    return write_curated(
        items,
        curated_dir(config.data.feedback_dir),
        load_frozen_test(config.data.test_path),
        config.clean.decontam_ngram,
    )


def user_corrections(config: PipelineConfig, since: float) -> list[CuratedItem]:
    """Corrections users sent with `/feedback` (rated since `since`) that the profile trusts
    for training, as it does for the memory: all of them under `memory.trust: feedback`, none
    under `trust: reviewed`, where they reach training only once reviewed in Label Studio."""
    if config.memory.trust == "reviewed":
        return []

    with InferenceStore() as store:
        answers = store.answers_since(since, rated=True)
    return feedback_corrections(answers, config.eval.live_holdout_fraction)
