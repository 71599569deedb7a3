"""Split: train and validation from the cleaned pool; the test split is a frozen file."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from components.config import DataConfig
from components.records import Example, content_hash, save_examples


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


def assign_validation(example: Example, fraction: float, seed: int) -> bool:
    """Stable per-example assignment, so new data never moves old examples between splits."""
    bucket = int(example.key()[:8], 16) ^ seed
    return (bucket % 10_000) < fraction * 10_000


def split(
    examples: list[Example],
    test: list[Example],
    config: DataConfig,
    out_dir: Path,
    continues: str | None = None,
) -> SplitResult:
    """Write train/validation/test JSONL files to `out_dir`.

    Under `max_train_examples`, a run that `continues` a champion (its version) replays
    another sample of the uncapped data than the champion saw, so each retrain widens what
    the weights have learned instead of repeating it."""
    train = [
        e for e in examples if not assign_validation(e, config.validation_fraction, config.seed)
    ]
    validation = [
        e for e in examples if assign_validation(e, config.validation_fraction, config.seed)
    ]
    if config.max_train_examples is not None and len(train) > config.max_train_examples:
        # What people taught the model is always kept; the cap samples the rest.
        taught = [e for e in train if e.origin == "feedback"][: config.max_train_examples]
        rest = [e for e in train if e.origin != "feedback"]
        room = config.max_train_examples - len(taught)
        sampler = random.Random(config.seed if continues is None else f"{config.seed}:{continues}")
        train = taught + sampler.sample(rest, room)
    if not train:
        raise ValueError(
            "no training examples left after the split; add data or lower data.validation_fraction"
        )
    paths = {name: out_dir / f"{name}.jsonl" for name in ("train", "validation", "test")}
    save_examples(paths["train"], train)
    save_examples(paths["validation"], validation)
    save_examples(paths["test"], test)
    return SplitResult(
        train_path=str(paths["train"]),
        validation_path=str(paths["validation"]),
        test_path=str(paths["test"]),
        train=len(train),
        validation=len(validation),
        test=len(test),
        train_hash=content_hash(train),
        test_hash=content_hash(test),
    )
