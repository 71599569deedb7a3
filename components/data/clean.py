"""Clean: normalise, scrub PII, filter (toxic and profane text too), deduplicate (exact and
near) and decontaminate.

Every removed example is written to `dropped.jsonl` with the filter that removed it, and the
report counts removals per filter and PII replacements per kind.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from components.config import CleanConfig
from components.content import profanity
from components.records import Example, content_hash, save_examples, write_jsonl
from components.text import Decontaminator, ngrams, normalize_text, scrub_pii, word_list

_TEXT_FIELDS = ("system", "instruction", "input", "output")
# Filters in the order they run; the report lists removals under these names.
FILTERS = (
    "profane",
    "too_short",
    "low_letter_ratio",
    "exact_duplicate",
    "test_overlap",
    "near_duplicate",
    "too_long",
)


@dataclass
class CleanResult:
    """The cleaned examples' file, the dropped ones, and what every filter did."""

    examples_path: str
    dropped_path: str
    kept: int
    removed: dict[str, int] = field(default_factory=dict)
    pii: dict[str, int] = field(default_factory=dict)
    content_hash: str = ""


class NearDuplicateIndex:
    """MinHash LSH over word shingles; `seen_similar` adds the text unless it is a near copy."""

    def __init__(self, threshold: float, num_perm: int, shingle_words: int) -> None:
        from datasketch import MinHash, MinHashLSH

        self._minhash = MinHash
        # Candidates are checked against the estimated Jaccard below, so tune the bands to
        # miss few true pairs (false negatives) at the cost of more candidates to check.
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
        self.threshold = threshold
        self.num_perm = num_perm
        self.shingle_words = shingle_words
        self.signatures: dict[str, object] = {}

    def _signature(self, text: str):  # -> MinHash
        words = word_list(text)
        shingles = (
            ngrams(words, self.shingle_words)
            if len(words) >= self.shingle_words
            else {tuple(words)}
        )
        signature = self._minhash(num_perm=self.num_perm)
        for shingle in shingles:
            signature.update(" ".join(shingle).encode("utf-8"))
        return signature

    def seen_similar(self, key: str, text: str) -> bool:
        signature = self._signature(text)
        for other in self.lsh.query(signature):
            if signature.jaccard(self.signatures[other]) >= self.threshold:
                return True
        self.lsh.insert(key, signature)
        self.signatures[key] = signature
        return False


def _full_text(example: Example) -> str:
    return "\n".join(getattr(example, name) for name in _TEXT_FIELDS)


def clean(
    examples: list[Example],
    config: CleanConfig,
    out_dir: Path,
    test_examples: list[Example],
    count_tokens: Callable[[Example], int],
) -> CleanResult:
    """Run every filter in order and write `clean.jsonl` and `dropped.jsonl` to `out_dir`."""
    removed: Counter[str] = Counter()
    pii: Counter[str] = Counter()
    dropped: list[dict] = []
    kept: list[Example] = []
    seen_exact: set[str] = set()
    near = NearDuplicateIndex(
        config.near_dup_threshold, config.minhash_permutations, config.shingle_words
    )
    contaminated = Decontaminator(test_examples, config.decontam_ngram)
    limit = config.max_profanity
    scores = profanity([_full_text(e) for e in examples]) if limit is not None else []

    for i, example in enumerate(examples):
        fields = {name: normalize_text(getattr(example, name)) for name in _TEXT_FIELDS}
        if config.scrub_pii:
            fields = {name: scrub_pii(value, pii) for name, value in fields.items()}
        cleaned = replace(example, **fields)
        profane = limit is not None and scores[i] >= limit
        reason = (
            "profane"
            if profane
            else _first_failing_filter(
                cleaned, config, seen_exact, near, contaminated, count_tokens
            )
        )
        if reason:
            removed[reason] += 1
            dropped.append({"filter": reason, **asdict(cleaned)})
        else:
            kept.append(cleaned)

    out_dir.mkdir(parents=True, exist_ok=True)
    examples_path = out_dir / "clean.jsonl"
    dropped_path = out_dir / "dropped.jsonl"
    save_examples(examples_path, kept)
    write_jsonl(dropped_path, dropped)
    return CleanResult(
        examples_path=str(examples_path),
        dropped_path=str(dropped_path),
        kept=len(kept),
        removed={name: removed.get(name, 0) for name in FILTERS},
        pii={kind: pii.get(kind, 0) for kind in ("email", "phone", "ip", "card")},
        content_hash=content_hash(kept),
    )


def _first_failing_filter(
    example: Example,
    config: CleanConfig,
    seen_exact: set[str],
    near: NearDuplicateIndex,
    contaminated: Decontaminator,
    count_tokens: Callable[[Example], int],
) -> str | None:
    if (
        len(example.instruction) < config.min_instruction_chars
        or len(example.output) < config.min_response_chars
    ):
        return "too_short"
    text = _full_text(example)
    letters = sum(ch.isalpha() for ch in text)
    if letters < config.min_letter_ratio * len(text.replace(" ", "").replace("\n", "")):
        return "low_letter_ratio"
    exact_key = hashlib.sha256(" ".join(word_list(text)).encode()).hexdigest()
    if exact_key in seen_exact:
        return "exact_duplicate"
    seen_exact.add(exact_key)
    if contaminated(example):
        return "test_overlap"
    if near.seen_similar(exact_key, text):
        return "near_duplicate"
    if count_tokens(example) > config.max_tokens:
        return "too_long"
    return None
