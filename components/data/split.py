"""Split: train and validation from the cleaned pool; the test split is a frozen file."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from components.config import DataConfig
from components.records import Example, content_hash, save_examples


@dataclass(frozen=True)
class Continuing:
    """The champion a run continues: its version, the corrections it already learned (their
    `Example.key()`; empty when its run did not record them) and how many of those to replay."""

    version: str
    learned: frozenset[str]
    replay: int


@dataclass
class SplitResult:
    train_path: str
    validation_path: str
    test_path: str
    train: int
    validation: int
    test: int
    train_hash: str
    test_hash: str
    learned_path: str  # every correction the trained weights will have learned
    corrections_new: int = 0  # in the training split, not learned before
    corrections_replayed: int = 0  # learned before, trained on again
    corrections_known: int = 0  # learned before (replayed or not)


def assign_validation(example: Example, fraction: float, seed: int) -> bool:
    """Stable per-example assignment, so new data never moves old examples between splits."""
    bucket = int(example.key()[:8], 16) ^ seed
    return (bucket % 10_000) < fraction * 10_000


def taught_part(
    train: list[Example], continuing: Continuing | None, seed: int
) -> tuple[list[Example], list[Example], int]:
    """The curated examples of the training split a run trains on: those the champion has not
    learned, and a sample of at most `replay` of those it has (another sample each champion);
    with the number it had learned. A run from the base trains on every one."""
    taught = [e for e in train if e.origin == "feedback"]
    if continuing is None:
        return taught, [], 0
    new = [e for e in taught if e.key() not in continuing.learned]
    known = [e for e in taught if e.key() in continuing.learned]
    sampler = random.Random(f"{seed}:replay:{continuing.version}")
    replayed = sampler.sample(known, min(continuing.replay, len(known)))
    return new, replayed, len(known)


def split(
    examples: list[Example],
    test: list[Example],
    config: DataConfig,
    out_dir: Path,
    continuing: Continuing | None = None,
) -> SplitResult:
    """Write train/validation/test JSONL files to `out_dir`, and `learned.json`: the keys of
    the corrections the weights will have learned (the champion's and the new ones).

    A run `continuing` a champion trains on the new corrections and a bounded replay of those
    the champion learned (`taught_part`). Under `max_train_examples`, it replays another
    sample of the uncapped seed data than the champion saw, so each retrain widens what the
    weights have learned instead of repeating it."""
    train = [
        e for e in examples if not assign_validation(e, config.validation_fraction, config.seed)
    ]
    validation = [
        e for e in examples if assign_validation(e, config.validation_fraction, config.seed)
    ]
    new, replayed, known = taught_part(train, continuing, config.seed)
    chosen = {id(e) for e in new + replayed}
    train = [e for e in train if e.origin != "feedback" or id(e) in chosen]
    if config.max_train_examples is not None and len(train) > config.max_train_examples:
        # What people taught the model is always kept; the cap samples the rest.
        taught = [e for e in train if e.origin == "feedback"][: config.max_train_examples]
        rest = [e for e in train if e.origin != "feedback"]
        room = config.max_train_examples - len(taught)
        sampler = random.Random(
            config.seed if continuing is None else f"{config.seed}:{continuing.version}"
        )
        train = taught + sampler.sample(rest, room)
    if not train:
        raise ValueError(
            "no training examples left after the split; add data or lower data.validation_fraction"
        )
    paths = {name: out_dir / f"{name}.jsonl" for name in ("train", "validation", "test")}
    save_examples(paths["train"], train)
    save_examples(paths["validation"], validation)
    save_examples(paths["test"], test)
    learned = set(continuing.learned if continuing else ())
    learned |= {e.key() for e in train if e.origin == "feedback"}
    learned_path = out_dir / "learned.json"
    learned_path.write_text(json.dumps(sorted(learned)))
    return SplitResult(
        train_path=str(paths["train"]),
        validation_path=str(paths["validation"]),
        test_path=str(paths["test"]),
        train=len(train),
        validation=len(validation),
        test=len(test),
        train_hash=content_hash(train),
        test_hash=content_hash(test),
        learned_path=str(learned_path),
        corrections_new=len(new),
        corrections_replayed=len(replayed),
        corrections_known=known,
    )
