"""The retrain recipe with the real sentence-embedding model."""

import pytest

from components.config import RecipeConfig
from components.records import Example
from components.train.recipe import (
    augment_curated,
    epochs,
    question_variants,
    rule_rewrites,
    terse_query,
)


@pytest.fixture(scope="module")
def embedder():
    from components.model.embedding import sentence_embedder

    return sentence_embedder()


def test_rule_rewrites_paraphrase_by_the_question_form() -> None:
    assert rule_rewrites("Which port does MLflow use?") == [
        "What port does MLflow use?",
        "Do you know which port does MLflow use?",
        "Port MLflow use?",
    ]
    assert rule_rewrites("How do I reset the worker?")[0] == "What is the way to reset the worker?"
    assert rule_rewrites("Reset the worker.") == ["Reset worker?"]
    assert rule_rewrites("Who is it?") == ["Tell me who is it."]


def test_the_terse_query_keeps_what_is_asked_about() -> None:
    assert terse_query("How often is the drift report emailed?") == (
        "How often drift report emailed?"
    )
    assert terse_query("Which Slack channel gets #ml-alerts, v2.1?") == (
        "Slack channel gets #ml-alerts v2.1?"
    )
    assert terse_query("What is it?") is None


def test_variants_keep_the_meaning_and_never_repeat_the_question(embedder) -> None:
    question = "Who approves a new base model for production?"
    config = RecipeConfig(question_variants=5, held_out_variants=1)
    variants = question_variants(question, config, embedder, seed=1)
    assert len(variants) == 6 and question not in variants and len(set(variants)) == 6
    assert variants == question_variants(question, config, embedder, seed=1)  # deterministic
    vectors = embedder.embed([question, *variants])
    assert (vectors[1:] @ vectors[0]).min() >= config.min_variant_similarity
    strict = RecipeConfig(question_variants=5, min_variant_similarity=0.999)
    assert question_variants(question, strict, embedder, seed=1) == []


def test_only_curated_examples_are_expanded(embedder) -> None:
    seed = Example(instruction="What is LoRA?", output="Low-rank adapters.")
    fix = Example(instruction="Which port does MLflow use?", output="Port 5077.", origin="feedback")
    config = RecipeConfig(question_variants=3, curated_repeats=2, held_out_variants=0)
    out = augment_curated([seed, fix], config, embedder, seed=0).train
    assert out[0] == seed and out.count(seed) == 1
    curated = out[1:]
    assert len(curated) == 2 * (1 + 3) and curated.count(fix) == 2
    assert {e.output for e in curated} == {"Port 5077."}
    assert {e.origin for e in curated} == {"feedback", "variant"}


def test_a_replayed_correction_is_seen_once_a_new_one_by_the_repeats(embedder) -> None:
    known = Example(
        instruction="Which port does MLflow use?", output="Port 5077.", origin="feedback"
    )
    fresh = Example(instruction="Who approves a new base model?", output="Dana.", origin="feedback")
    config = RecipeConfig(question_variants=2, curated_repeats=3, held_out_variants=0)
    out = augment_curated(
        [known, fresh], config, embedder, seed=0, replayed=frozenset({known.key()})
    )
    assert out.train.count(known) == 1 and out.train.count(fresh) == 3
    assert sum(e.output == "Port 5077." for e in out.train) == 1 + 2


def test_held_out_and_stopping_rewrites_are_never_trained_on(embedder) -> None:
    fixes = [
        Example(instruction="Which port does MLflow use?", output="Port 5077.", origin="feedback"),
        # another curated wording that is also a rewrite of the first
        Example(instruction="What port does MLflow use?", output="Port 5077.", origin="feedback"),
        Example(instruction="Who approves a new base model?", output="Dana.", origin="feedback"),
    ]
    config = RecipeConfig(question_variants=2, held_out_variants=2, stop_variants=1)
    out = augment_curated(fixes, config, embedder, seed=0)
    trained = {e.instruction.lower() for e in out.train}
    kept_out = [e.instruction.lower() for e in out.held_out + out.stop]
    assert out.held_out and out.stop and len(set(kept_out)) == len(kept_out)
    assert not trained & set(kept_out)
    assert {e.output for e in out.held_out + out.stop} <= {"Port 5077.", "Dana."}


def test_small_training_sets_train_for_more_epochs() -> None:
    from components.config import TrainConfig

    train = TrainConfig(epochs=1, batch_size=8)
    recipe = RecipeConfig(min_steps=40, max_epochs=3)
    assert epochs(320, train, recipe) == 1  # 40 steps in one epoch already
    assert epochs(160, train, recipe) == 2
    assert epochs(16, train, recipe) == 3  # capped
    assert epochs(16, train, RecipeConfig()) == 1  # min_steps 0: the profile's epochs


def test_early_stopping_needs_its_set() -> None:
    with pytest.raises(ValueError, match="stop_variants"):
        RecipeConfig(early_stopping_patience=2)
