import numpy as np
import pytest

from components.evaluate.evaluation import (
    HIGHER_IS_BETTER,
    METRICS,
    bootstrap_indices,
    compare,
    metric_statistic,
    per_example_scores,
    summarize,
)
from components.evaluate.metrics import load_metric

REFS = [f"Run make test number {i} from the repository root." for i in range(40)]
GOOD = list(REFS)
BAD = [f"I like gardening on day {i}." for i in range(40)]
LIKELY = [(2.0, 10)] * 40
UNLIKELY = [(40.0, 10)] * 40


def test_metric_modules_load_offline_from_local_paths() -> None:
    result = load_metric("rouge_l").compute(predictions=["a b c"], references=["a b d"])
    assert result["rouge_l"] == pytest.approx(2 / 3)
    assert (
        load_metric("exact_match").compute(predictions=[" A  b"], references=["a b"])["exact_match"]
        == 1.0
    )


def test_bootstrapped_bleu_matches_sacrebleu_corpus_score() -> None:
    import sacrebleu

    preds = ["the cat sat on the mat", "make test runs pytest", "hello there"]
    refs = ["the cat sat on a mat", "make test runs the suite", "hello"]
    stats = np.asarray(
        load_metric("bleu_stats").compute(predictions=preds, references=refs)["per_example"]
    )
    expected = sacrebleu.corpus_bleu(preds, [refs]).score
    assert float(metric_statistic("bleu", stats)) == pytest.approx(expected)


def test_intervals_contain_the_value_and_rank_models() -> None:
    good = per_example_scores(GOOD, REFS, LIKELY)
    bad = per_example_scores(BAD, REFS, UNLIKELY)
    idx = bootstrap_indices(len(REFS), 300)
    summary = summarize(good, idx, 0.95)
    for metric in METRICS:
        s = summary[metric]
        assert s["low"] <= s["value"] <= s["high"]
    assert summary["exact_match"]["value"] == 1.0
    assert summary["perplexity"]["value"] == pytest.approx(np.exp(0.2))
    for metric in METRICS:
        result = compare(good, bad, "base", metric, idx, 0.95)
        assert result.candidate_is_better, metric
        assert (result.difference > 0) == HIGHER_IS_BETTER[metric]


def test_identical_models_are_not_called_better() -> None:
    scores = per_example_scores(GOOD[:20] + BAD[:20], REFS, LIKELY)
    idx = bootstrap_indices(len(REFS), 300)
    result = compare(scores, scores, "champion", "rouge_l", idx, 0.95)
    assert result.difference == 0 and not result.candidate_is_better


@pytest.mark.slow
def test_evaluate_models_end_to_end_on_tiny_model(tmp_path, tiny_base, tiny_config) -> None:
    from components.data.ingest import load_frozen_test
    from components.evaluate.evaluation import ModelSpec, evaluate_models
    from components.records import read_jsonl

    examples = load_frozen_test(tiny_config.data.test_path)
    result = evaluate_models(
        {"base": ModelSpec(tiny_base.path), "candidate": ModelSpec(tiny_base.path)},
        examples,
        tiny_config.eval,
        tmp_path,
    )
    assert result.n_examples == tiny_config.eval.max_examples
    assert set(result.scores) == {"base", "candidate"}
    assert result.scores["base"] == result.scores["candidate"]  # same weights, same answers
    assert result.comparison.reference == "base"
    assert not result.comparison.candidate_is_better
    assert (tmp_path / "metrics.png").stat().st_size > 1000
    assert len(read_jsonl(tmp_path / "samples.jsonl")) == tiny_config.eval.samples_to_log


@pytest.mark.slow
def test_greedy_answers_are_generated_once_per_weights_prompts_and_settings(
    home, tiny_base, tiny_config, monkeypatch
) -> None:
    from components.data.ingest import load_frozen_test
    from components.evaluate import evaluation
    from components.evaluate.evaluation import ModelSpec, model_answers

    examples = load_frozen_test(tiny_config.data.test_path)[:4]
    calls = []
    real = evaluation.generate_answers
    monkeypatch.setattr(evaluation, "generate_answers", lambda *a: calls.append(1) or real(*a))
    spec = ModelSpec(tiny_base.path)
    first = model_answers(spec, examples, tiny_config.eval)
    assert model_answers(spec, examples, tiny_config.eval) == first and len(calls) == 1
    model_answers(spec, examples[:3], tiny_config.eval)  # other prompts
    longer = tiny_config.eval.model_copy(update={"max_new_tokens": 3})
    model_answers(spec, examples, longer)  # other settings
    assert len(calls) == 3
    assert len(list((home / "eval-cache").glob("*.json"))) == 3
