"""The retrain recipe: how curated corrections are turned into training examples that stick.

Seen once per epoch, a correction teaches the model the answer's form with the wrong value;
seen under several wordings of its question it is learned. Each curated example (a user's or
a reviewer's correction, or a user's own rephrasing of a corrected question) gets up to
`recipe.question_variants` rewrites of its question: rule-based paraphrases (question word
swaps, imperative forms) and surface forms (greetings, requests for brevity), kept only when
the sentence-embedding model finds them at least `recipe.min_variant_similarity` similar to
the original, so a rewrite never changes what is asked. The answer stays the correction, and
every curated example with its variants is repeated `recipe.curated_repeats` times per epoch.
The seed data is replayed alongside, so what worked before is not forgotten.
"""

from __future__ import annotations

import random
import re
from dataclasses import replace
from typing import Any

from components.config import RecipeConfig
from components.records import Example

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
_SURFACES: tuple[str, ...] = (
    "Quick question: {q}",
    "{q} Please keep it short.",
    "I need to know something. {q}",
    "hey, {lower}",
    "Can you help? {q}",
    "{q} Thanks!",
)


def rule_rewrites(question: str) -> list[str]:
    """Paraphrases of the question by rule (none when no rule matches its form)."""
    text = " ".join(question.split())
    found = []
    for pattern, replacement in _REWRITES:
        if re.match(pattern, text, flags=re.IGNORECASE):
            rewritten = re.sub(pattern, replacement, text, flags=re.IGNORECASE)
            found.append(rewritten[0].upper() + rewritten[1:])
    return found


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
    """Up to `question_variants` rewrites that keep the question's meaning."""
    if config.question_variants == 0:
        return []
    candidates = candidate_variants(question, seed)
    if not candidates:
        return []
    vectors = embedder.embed([question, *candidates])
    similarity = vectors[1:] @ vectors[0]
    kept = [
        c for c, s in zip(candidates, similarity, strict=True) if s >= config.min_variant_similarity
    ]
    return kept[: config.question_variants]


def augment_curated(
    examples: list[Example], config: RecipeConfig, embedder: Any, seed: int
) -> list[Example]:
    """The training examples with every curated one expanded by the recipe."""
    out = []
    for example in examples:
        if example.origin != "feedback":
            out.append(example)
            continue
        group = [example] + [
            replace(example, instruction=v, origin="variant")
            for v in question_variants(example.instruction, config, embedder, seed)
        ]
        out.extend(group * config.curated_repeats)
    return out
