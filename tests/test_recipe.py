"""The retrain recipe with the real sentence-embedding model."""

import pytest

from components.config import RecipeConfig
from components.records import Example
from components.train.recipe import augment_curated, question_variants, rule_rewrites


@pytest.fixture(scope="module")
def embedder():
    from components.model.embedding import sentence_embedder

    return sentence_embedder()


def test_rule_rewrites_paraphrase_by_the_question_form() -> None:
    assert rule_rewrites("Which port does MLflow use?") == [
        "What port does MLflow use?",
        "Do you know which port does MLflow use?",
    ]
    assert rule_rewrites("How do I reset the worker?")[0] == "What is the way to reset the worker?"
    assert rule_rewrites("Reset the worker.") == []


def test_variants_keep_the_meaning_and_never_repeat_the_question(embedder) -> None:
    question = "Who approves a new base model for production?"
    config = RecipeConfig(question_variants=5)
    variants = question_variants(question, config, embedder, seed=1)
    assert len(variants) == 5 and question not in variants and len(set(variants)) == 5
    assert variants == question_variants(question, config, embedder, seed=1)  # deterministic
    vectors = embedder.embed([question, *variants])
    assert (vectors[1:] @ vectors[0]).min() >= config.min_variant_similarity
    strict = RecipeConfig(question_variants=5, min_variant_similarity=0.999)
    assert question_variants(question, strict, embedder, seed=1) == []


def test_only_curated_examples_are_expanded(embedder) -> None:
    seed = Example(instruction="What is LoRA?", output="Low-rank adapters.")
    fix = Example(instruction="Which port does MLflow use?", output="Port 5077.", origin="feedback")
    config = RecipeConfig(question_variants=3, curated_repeats=2)
    out = augment_curated([seed, fix], config, embedder, seed=0)
    assert out[0] == seed and out.count(seed) == 1
    curated = out[1:]
    assert len(curated) == 2 * (1 + 3) and curated.count(fix) == 2
    assert {e.output for e in curated} == {"Port 5077."}
    assert {e.origin for e in curated} == {"feedback", "variant"}
