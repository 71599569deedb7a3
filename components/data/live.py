"""The live evaluation set: what users corrected, built from production.

- The corrections themselves: every correction the memory serves (its question, with the
  correction as the reference). They are trained on too: does the candidate now state them?
- Rephrasings from traffic: requests the memory answered and the user did not rate down are
  users' own rephrasings of a corrected question, with the correction as the reference. They
  are split by request, deterministically (a hash of the request id), into trainable ones
  (written to the curated data, so the next training run learns them) and held-out ones,
  which are never trained on and judge whether a candidate generalises.
- Generated rephrasings: the retrain recipe's held-out rewrites of each curated question
  (`recipe.held_out_variants`, see components/train/recipe.py), never trained on either.

Each build writes `live/live-<hash>.jsonl` (the judged items) in the curated folder, named by
its content hash, so every training run records exactly which live set judged it; training
ingests only the curated version files, never this one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from components.config import PipelineConfig
from components.data.curated import CuratedItem, curate, held_out
from components.inference.records import Answer
from components.inference.store import InferenceStore
from components.memory.store import CorrectionMemory, MemoryEntry
from components.paths import curated_dir
from components.records import Example, content_hash, load_examples, save_examples
from components.text import question_key


@dataclass(frozen=True)
class LiveItems:
    corrections: list[Example]
    trainable: list[CuratedItem]  # rephrasings the next training run learns
    held_out: list[Example]  # rephrasings never trained on


def live_items(entries: list[MemoryEntry], answers: list[Answer], fraction: float) -> LiveItems:
    """Corrections from the served entries; rephrasings from the answers they gave."""
    by_id = {e.id: e for e in entries}
    corrections = [Example(instruction=e.question, output=e.answer, origin="live") for e in entries]
    asked = {question_key(e.question) for e in entries}
    trainable, held = [], []
    for answer in answers:
        entry = by_id.get(answer.memory_entry or "")
        if entry is None or answer.rating == "down" or not answer.prompt.strip():
            continue
        if question_key(answer.prompt) in asked:
            continue  # the corrected question itself, asked again: not a rephrasing
        if held_out(answer.request_id, fraction):
            held.append(Example(instruction=answer.prompt, output=entry.answer, origin="live"))
        else:
            trainable.append(
                CuratedItem.answering(
                    answer, entry.answer, "rephrasing", "memory-hit", "memory_hit"
                )
            )
    return LiveItems(corrections, trainable, held)


@dataclass
class LiveSet:
    path: str | None  # the judged items, None when there are none
    content_hash: str
    corrections: int
    held_out: int
    trainable_written: int
    variants: int = 0  # the recipe's held-out rewrites

    @property
    def size(self) -> int:
        return self.corrections + self.held_out + self.variants

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_live_set(config: PipelineConfig) -> LiveSet:
    """Read the memory and the inference log; write new trainable rephrasings to the curated
    data and the judged items (corrections + held-out rephrasings) as a versioned file."""
    if not config.memory.enabled:
        return LiveSet(None, "", 0, 0, 0)
    memory = CorrectionMemory(config.memory)
    try:
        entries = memory.served()
    finally:
        memory.close()
    with InferenceStore() as store:
        answers = [a for a in store.answers_since(0) if a.memory_entry]
    items = live_items(entries, answers, config.eval.live_holdout_fraction)
    written = curate(config, items.trainable).written if items.trainable else 0
    judged = items.corrections + items.held_out
    if not judged:
        return LiveSet(None, "", 0, 0, written)
    digest, path = _save(config, judged)
    return LiveSet(str(path), digest, len(items.corrections), len(items.held_out), written)


def _save(config: PipelineConfig, judged: list[Example]) -> tuple[str, Path]:
    digest = content_hash(judged)
    path = curated_dir(config.data.feedback_dir) / "live" / f"live-{digest[:12]}.jsonl"
    if not path.is_file():
        save_examples(path, judged)
    return digest, path


def with_variants(config: PipelineConfig, live: LiveSet, variants: list[Example]) -> LiveSet:
    """The live set with the recipe's held-out rewrites added, saved under its new hash."""
    if not variants:
        return live
    judged = load_examples(Path(live.path)) if live.path else []
    judged += variants
    digest, path = _save(config, judged)
    return replace(live, path=str(path), content_hash=digest, variants=len(variants))
