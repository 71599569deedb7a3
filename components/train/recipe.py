"""The retrain recipe: how curated corrections are turned into training examples that stick.

Seen once per epoch, a correction teaches the model the answer's form with the wrong value;
seen under several wordings of its question it is learned. Each curated example (a user's or
a reviewer's correction, or a user's own rephrasing of a corrected question) gets up to
`recipe.question_variants` rewrites of its question: rule-based paraphrases (question word
swaps, imperative forms) and surface forms (greetings, requests for brevity), kept only when
the sentence-embedding model finds them at least `recipe.min_variant_similarity` similar to
the original, so a rewrite never changes what is asked. The answer stays the correction, and
every curated example with its variants is repeated `recipe.curated_repeats` times per epoch.
The seed data is replayed alongside, so what worked before is not forgotten. A retrain that
continues the champion trains on the corrections it has not learned and replays at most
`recipe.replay` of those it has, once per epoch each (components/data/split.py).

The next kept rewrites are never trained on: `recipe.held_out_variants` of them join the live
set (does the candidate state the fact when asked in words it never saw?), and
`recipe.stop_variants` more are the early-stopping set (`recipe.early_stopping_patience`).
How long training runs follows the data's size (`epochs`).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field, replace
from typing import Any

from components.config import RecipeConfig, TrainConfig
from components.records import Example
from components.text import question_key

# Paraphrase rules: (pattern over the whole question, replacement); applied where they match.
_REWRITES: tuple[tuple[str, str], ...] = (
    (r"^what is (.+?)\??$", r"Tell me \1."),
    (r"^what is (.+?)\??$", r"What's \1?"),
    (r"^what are (.+?)\??$", r"Tell me \1."),
    (r"^which (.+?)\??$", r"What \1?"),
    (r"^which (.+?)\??$", r"Do you know which \1?"),
    (r"^who (.+?)\??$", r"Tell me who \1."),
    (r"^how do i (.+?)\??$", r"What is the way to \1?"),
    (r"^how do i (.+?)\??$", r"How can I \1?"),
    (r"^how (long|many|much) (.+?)\??$", r"Tell me how \1 \2."),
    (r"^where (.+?)\??$", r"Tell me where \1."),
    (r"^when (.+?)\??$", r"Tell me when \1."),
    (r"^(is|are|does|do|can) (.+?)\??$", r"Tell me whether \2."),
)
# Function words a terse query drops; what is left names what is asked about.
_FUNCTION_WORDS = frozenset(
    {
        *("a", "an", "the", "of", "to", "in", "on", "at", "for", "by", "with", "from", "about"),
        *("as", "is", "are", "was", "were", "be", "been", "does", "do", "did", "can", "could"),
        *("should", "would", "will", "shall", "may", "might", "must", "has", "have", "had"),
        *("i", "we", "you", "our", "your", "my", "it", "its", "this", "that", "these", "those"),
        *("there", "which", "what", "who", "whom", "whose", "when", "where", "why", "please"),
        *("tell", "me", "us", "and", "or"),
    }
)
_SURFACES: tuple[str, ...] = (
    "Quick question: {q}",
    "{q} Please keep it short.",
    "I need to know something. {q}",
    "hey, {lower}",
    "Can you help? {q}",
    "{q} Thanks!",
)


def terse_query(question: str) -> str | None:
    """The question as a search-style query of its content words ("Which port does the staging
    MLflow server listen on?" -> "Port staging MLflow server listen?"), which ties the answer
    to what is asked about rather than to one wording; None when fewer than two content words
    are left."""
    tokens = (w.strip(".,:") for w in re.findall(r"[\w#@.,:/'-]+", question))
    words = [w for w in tokens if w and w.lower() not in _FUNCTION_WORDS]
    if len(words) < 2:
        return None
    return words[0][0].upper() + words[0][1:] + " " + " ".join(words[1:]) + "?"


def rule_rewrites(question: str) -> list[str]:
    """Paraphrases of the question by rule: question-word rewrites where they match its form,
    then its terse query."""
    text = " ".join(question.split())
    found = []
    for pattern, replacement in _REWRITES:
        if re.match(pattern, text, flags=re.IGNORECASE):
            rewritten = re.sub(pattern, replacement, text, flags=re.IGNORECASE)
            found.append(rewritten[0].upper() + rewritten[1:])
    terse = terse_query(text)
    return [*found, terse] if terse else found


def candidate_variants(question: str, seed: int) -> list[str]:
    """Rule paraphrases first, then surface forms in a seeded order; the question excluded."""
    text = " ".join(question.split())
    lower = text[0].lower() + text[1:] if text else text
    surfaces = [s.format(q=text, lower=lower) for s in _SURFACES]
    random.Random(f"{seed}:{text}").shuffle(surfaces)
    seen, out = {text.lower()}, []
    for variant in [*rule_rewrites(text), *surfaces]:
        if variant.lower() not in seen:
            seen.add(variant.lower())
            out.append(variant)
    return out


def question_variants(question: str, config: RecipeConfig, embedder: Any, seed: int) -> list[str]:
    """Up to `question_variants + held_out_variants + stop_variants` rewrites that keep the
    question's meaning, the trained ones first."""
    wanted = config.question_variants + config.held_out_variants + config.stop_variants
    if wanted == 0:
        return []
    candidates = candidate_variants(question, seed)
    if not candidates:
        return []
    vectors = embedder.embed([question, *candidates])
    similarity = vectors[1:] @ vectors[0]
    kept = [
        c for c, s in zip(candidates, similarity, strict=True) if s >= config.min_variant_similarity
    ]
    return kept[:wanted]


@dataclass
class Augmented:
    """The training examples with the curated ones expanded, and the rewrites kept out."""

    train: list[Example]
    held_out: list[Example] = field(default_factory=list)  # judged in the live set
    stop: list[Example] = field(default_factory=list)  # the early-stopping set


def augment_curated(
    examples: list[Example],
    config: RecipeConfig,
    embedder: Any,
    seed: int,
    replayed: frozenset[str] = frozenset(),
) -> Augmented:
    """Every curated example expanded by the recipe; the rewrites past `question_variants`
    are set aside, and one that is also trained on (another example's wording) is dropped.
    A `replayed` one (by key: learned by the weights this run continues) is seen once per
    epoch, a new one `curated_repeats` times."""
    out = Augmented(train=[])
    kept_out: list[tuple[str, Example]] = []
    trained = config.question_variants
    for example in examples:
        if example.origin != "feedback":
            out.train.append(example)
            continue
        variants = question_variants(example.instruction, config, embedder, seed)
        group = [example] + [
            replace(example, instruction=v, origin="variant") for v in variants[:trained]
        ]
        out.train.extend(group * (1 if example.key() in replayed else config.curated_repeats))
        for i, variant in enumerate(variants[trained:]):
            side = "held_out" if i < config.held_out_variants else "stop"
            kept_out.append((side, replace(example, instruction=variant, origin="variant")))
    seen = {question_key(e.instruction) for e in out.train}
    for side, example in kept_out:
        if question_key(example.instruction) not in seen:
            seen.add(question_key(example.instruction))
            getattr(out, side).append(example)
    return out


def epochs(train_size: int, train: TrainConfig, config: RecipeConfig) -> float:
    """`train.epochs`, raised for a small training set until it makes `recipe.min_steps`
    optimizer steps, never past `recipe.max_epochs` (early stopping may end it sooner)."""
    per_epoch = max(
        1, math.ceil(train_size / (train.batch_size * train.gradient_accumulation_steps))
    )
    needed = config.min_steps / per_epoch
    return max(train.epochs, min(needed, config.max_epochs))
