"""Is a converted engine fit to serve? Its answers on the frozen test split against the float32
reference's: the engine's ROUGE-L must not fall below the lower end of the reference's
bootstrap interval (compressed weights and another kernel are allowed to differ, not to be
worse beyond what the test split can tell apart)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from components.config import PipelineConfig
from components.data.ingest import load_frozen_test
from components.evaluate.evaluation import (
    ModelSpec,
    bootstrap_indices,
    bootstrap_interval,
    model_answers,
)
from components.evaluate.metrics import load_metric
from components.model.chat import render_chat
from components.model.generation import GenerationRequest
from components.serving.engine import Engine

VERDICT_FILE = "quality.json"


class EngineRejected(RuntimeError):
    """The converted engine answers worse than the reference: it is not served."""


@dataclass(frozen=True)
class EngineQuality:
    engine: str
    examples: int
    rouge_l: float
    reference_rouge_l: float
    reference_low: float
    reference_high: float
    confidence: float

    @property
    def passed(self) -> bool:
        return self.rouge_l >= self.reference_low

    def summary(self) -> str:
        verdict = "inside" if self.passed else "below"
        return (
            f"{self.engine} ROUGE-L {self.rouge_l:.3f} on {self.examples} frozen examples, "
            f"{verdict} the float32 reference's {self.reference_rouge_l:.3f} "
            f"[{self.reference_low:.3f}, {self.reference_high:.3f}]"
        )


def check_engine(
    engine: Engine,
    tokenizer: object,
    base_path: str,
    adapter_dir: str | None,
    config: PipelineConfig,
) -> EngineQuality:
    """Score the engine's greedy answers and the reference's (cached by the evaluation when
    it scored the same weights) on the profile's frozen test split."""
    examples = load_frozen_test(config.data.test_path)[: config.eval.max_examples]
    if not examples:
        raise ValueError(f"the frozen test split {config.data.test_path} is empty")
    reference, _ = model_answers(ModelSpec(base_path, adapter_dir), examples, config.eval)
    requests = [
        GenerationRequest(
            render_chat(tokenizer, e.messages(with_answer=False)), config.eval.max_new_tokens
        )
        for e in examples
    ]
    answers = [g.text for g in engine.generate(requests)]
    truth = [e.output for e in examples]
    rouge = load_metric("rouge_l")
    ours = np.asarray(rouge.compute(predictions=answers, references=truth)["per_example"])
    theirs = np.asarray(rouge.compute(predictions=reference, references=truth)["per_example"])
    resampled = theirs[bootstrap_indices(len(examples), config.eval.bootstrap_samples)].mean(-1)
    low, high = bootstrap_interval(resampled, config.eval.confidence)
    return EngineQuality(
        engine=engine.name,
        examples=len(examples),
        rouge_l=float(ours.mean()),
        reference_rouge_l=float(theirs.mean()),
        reference_low=low,
        reference_high=high,
        confidence=config.eval.confidence,
    )


def checked_once(folder: Path, check: Callable[[], EngineQuality]) -> EngineQuality:
    """The verdict kept beside the converted weights, measured the first time."""
    path = folder / VERDICT_FILE
    if path.is_file():
        return EngineQuality(**json.loads(path.read_text()))
    quality = check()
    path.write_text(json.dumps(asdict(quality), indent=1))
    return quality
