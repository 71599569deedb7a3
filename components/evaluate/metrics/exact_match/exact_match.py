"""Exact match after lower-casing and collapsing whitespace, per example."""

import datasets
import evaluate


def _norm(text):
    return " ".join(text.lower().split())


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="1.0 where the normalised prediction equals the normalised reference.",
            citation="",
            inputs_description="predictions and references: lists of strings of equal length",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        hits = [float(_norm(p) == _norm(r)) for p, r in zip(predictions, references, strict=True)]
        return {"exact_match": sum(hits) / max(len(hits), 1), "per_example": hits}
