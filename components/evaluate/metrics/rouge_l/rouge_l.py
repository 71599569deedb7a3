"""ROUGE-L F-measure per example (longest common subsequence), with stemming."""

from rouge_score import rouge_scorer

# The module, not its class: `evaluate` serves the first metric class it finds here.
from components.evaluate.metrics import pairwise


class RougeL(pairwise.PairwiseMetric):
    DESCRIPTION = "ROUGE-L F-measure between each prediction and its reference."
    CITATION = "Lin, ROUGE: A Package for Automatic Evaluation of Summaries, 2004."

    def _compute(self, predictions, references):
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        scores = [
            scorer.score(ref, pred)["rougeL"].fmeasure
            for pred, ref in zip(predictions, references, strict=True)
        ]
        return {"rouge_l": sum(scores) / max(len(scores), 1), "per_example": scores}
