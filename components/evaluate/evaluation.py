"""Evaluate: candidate vs base vs champion on the same frozen test prompts.

Every model answers the same prompts (greedy). Per-example scores feed paired bootstrap
confidence intervals: the same resampled indices are used for every model, so the interval
of a difference between two models is meaningful. Greedy answers are a function of the
weights, the prompts and the settings, so they are kept under `$FLYWHEEL_HOME/eval-cache`:
a retrain generates only the candidate's, not again the base's and the champion's.
"""

from __future__ import annotations

import gc
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from components.config import EvalConfig
from components.evaluate.metrics import load_metric
from components.model.base_model import weights_sha256
from components.model.generation import answer_log_likelihoods, generate_chat, load_for_inference
from components.paths import eval_cache_dir
from components.plots import plot_metric_comparison
from components.records import Example, write_jsonl

METRICS = ("rouge_l", "bleu", "exact_match", "perplexity")
HIGHER_IS_BETTER = {"rouge_l": True, "bleu": True, "exact_match": True, "perplexity": False}


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: a base folder and optionally a LoRA adapter on top of it."""

    base_path: str
    adapter_dir: str | None = None


@dataclass
class Comparison:
    """The gate's evidence: candidate minus reference on one metric, with its interval."""

    metric: str
    reference: str
    candidate_value: float
    reference_value: float
    difference: float
    low: float
    high: float
    confidence: float

    @property
    def candidate_is_better(self) -> bool:
        """True if the whole interval of the difference lies on the better side of zero."""
        return self.low > 0 if HIGHER_IS_BETTER[self.metric] else self.high < 0


@dataclass
class EvalResult:
    n_examples: int
    scores: dict[str, dict[str, dict[str, float]]]  # model -> metric -> value/low/high
    comparison: Comparison
    samples_path: str
    plot_path: str
    generations: dict[str, list[str]] = field(default_factory=dict)
    anchor: Comparison | None = None  # the candidate against the anchor version, if any

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("generations")
        data["comparison"]["candidate_is_better"] = self.comparison.candidate_is_better
        return data


def _batched(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def generate_answers(
    model: Any, tokenizer: Any, examples: list[Example], config: EvalConfig
) -> list[str]:
    """Greedy answers, batched; prompts sorted by length so batches pad little."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt()))
    answers: dict[int, str] = {}
    for chunk in _batched(order, config.batch_size):
        outputs = generate_chat(
            model,
            tokenizer,
            [examples[i].messages(with_answer=False) for i in chunk],
            max_new_tokens=config.max_new_tokens,
        )
        answers.update(zip(chunk, (o.text for o in outputs), strict=True))
    return [answers[i] for i in range(len(examples))]


def answers_key(spec: ModelSpec, examples: list[Example], config: EvalConfig) -> str:
    """What a model's greedy answers depend on: its weights, the prompts and the settings."""
    weights = [weights_sha256(Path(spec.base_path))]
    if spec.adapter_dir:
        weights.append(weights_sha256(Path(spec.adapter_dir)))
    text = json.dumps(
        {
            "weights": weights,
            "examples": [[e.messages(with_answer=False), e.output] for e in examples],
            "max_new_tokens": config.max_new_tokens,
            "batch_size": config.batch_size,
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def model_answers(
    spec: ModelSpec, examples: list[Example], config: EvalConfig
) -> tuple[list[str], list[tuple[float, int]]]:
    """The model's greedy answers and answer log-likelihoods, from the cache when known."""
    cached = eval_cache_dir() / f"{answers_key(spec, examples, config)}.json"
    if cached.is_file():
        known = json.loads(cached.read_text())
        return known["answers"], [tuple(x) for x in known["likelihoods"]]
    model, tokenizer = load_for_inference(spec.base_path, spec.adapter_dir)
    answers = generate_answers(model, tokenizer, examples, config)
    likelihoods = answer_log_likelihoods(model, tokenizer, examples, config.batch_size)
    del model
    gc.collect()
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(".tmp")
    partial.write_text(json.dumps({"answers": answers, "likelihoods": likelihoods}))
    partial.replace(cached)
    return answers, likelihoods


def per_example_scores(
    predictions: list[str], references: list[str], likelihoods: list[tuple[float, int]]
) -> dict[str, np.ndarray]:
    """The per-example values each metric's statistic is computed from."""
    kwargs = {"predictions": predictions, "references": references}
    return {
        "rouge_l": np.asarray(load_metric("rouge_l").compute(**kwargs)["per_example"]),
        "bleu": np.asarray(load_metric("bleu_stats").compute(**kwargs)["per_example"]),
        "exact_match": np.asarray(load_metric("exact_match").compute(**kwargs)["per_example"]),
        "perplexity": np.asarray(likelihoods, dtype=float),
    }


def metric_statistic(metric: str, values: np.ndarray) -> np.ndarray:
    """The metric over the last-but-one axis, for one sample (n, ...) or many (B, n, ...)."""
    if metric in ("rouge_l", "exact_match"):
        return values.mean(axis=-1)
    if metric == "perplexity":
        return np.exp(values[..., 0].sum(axis=-1) / np.maximum(values[..., 1].sum(axis=-1), 1))
    from sacrebleu import BLEU

    totals = values.sum(axis=-2)
    flat = totals.reshape(-1, totals.shape[-1])
    scores = [
        BLEU.compute_bleu(list(t[:4]), list(t[4:8]), int(t[8]), int(t[9])).score for t in flat
    ]
    return np.asarray(scores).reshape(totals.shape[:-1])


def bootstrap_interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_indices(n: int, samples: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def summarize(
    per_example: dict[str, np.ndarray], indices: np.ndarray, confidence: float
) -> dict[str, dict[str, float]]:
    """Each metric's value on the full set and its bootstrap interval."""
    summary = {}
    for metric in METRICS:
        values = per_example[metric]
        low, high = bootstrap_interval(metric_statistic(metric, values[indices]), confidence)
        summary[metric] = {
            "value": float(metric_statistic(metric, values)),
            "low": low,
            "high": high,
        }
    return summary


def compare(
    candidate: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    reference_name: str,
    metric: str,
    indices: np.ndarray,
    confidence: float,
) -> Comparison:
    """Paired bootstrap interval of (candidate - reference) on one metric."""
    diffs = metric_statistic(metric, candidate[metric][indices]) - metric_statistic(
        metric, reference[metric][indices]
    )
    low, high = bootstrap_interval(diffs, confidence)
    cand = float(metric_statistic(metric, candidate[metric]))
    ref = float(metric_statistic(metric, reference[metric]))
    return Comparison(
        metric=metric,
        reference=reference_name,
        candidate_value=cand,
        reference_value=ref,
        difference=cand - ref,
        low=low,
        high=high,
        confidence=confidence,
    )


def evaluate_models(
    models: dict[str, ModelSpec],
    examples: list[Example],
    config: EvalConfig,
    out_dir: Path,
    candidate: str = "candidate",
    anchor: str | None = None,
) -> EvalResult:
    """Score every model on `examples`; compare the candidate with the champion, else the base,
    and with `anchor` (the name in `models` of the anchor version, the champion's when it is
    the anchor) when given."""
    if config.max_examples is not None:
        examples = examples[: config.max_examples]
    if not examples:
        raise ValueError("the frozen test split is empty")
    references = [e.output for e in examples]
    per_model: dict[str, dict[str, np.ndarray]] = {}
    generations: dict[str, list[str]] = {}
    for name, spec in models.items():
        generations[name], likelihoods = model_answers(spec, examples, config)
        per_model[name] = per_example_scores(generations[name], references, likelihoods)

    indices = bootstrap_indices(len(examples), config.bootstrap_samples)
    scores = {
        name: summarize(values, indices, config.confidence) for name, values in per_model.items()
    }
    reference = "champion" if "champion" in per_model else "base"
    comparison = compare(
        per_model[candidate],
        per_model[reference],
        reference,
        config.gate_metric,
        indices,
        config.confidence,
    )

    anchored = None
    if anchor is not None:
        anchored = compare(
            per_model[candidate],
            per_model[anchor],
            "anchor",
            config.gate_metric,
            indices,
            config.confidence,
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    samples = [
        {
            "prompt": e.prompt(),
            "reference": e.output,
            **{name: generations[name][i] for name in generations},
        }
        for i, e in enumerate(examples[: config.samples_to_log])
    ]
    samples_path = out_dir / "samples.jsonl"
    write_jsonl(samples_path, samples)
    (out_dir / "scores.json").write_text(json.dumps(scores, indent=1))
    plot = plot_metric_comparison(
        {
            m: {name: (s[m]["value"], s[m]["low"], s[m]["high"]) for name, s in scores.items()}
            for m in METRICS
        },
        out_dir / "metrics.png",
        title=f"Frozen test split, n={len(examples)}, {config.confidence:.0%} bootstrap CI",
    )
    return EvalResult(
        n_examples=len(examples),
        scores=scores,
        comparison=comparison,
        samples_path=str(samples_path),
        plot_path=str(plot),
        generations=generations,
        anchor=anchored,
    )
