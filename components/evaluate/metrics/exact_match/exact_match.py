"""Exact match after lower-casing and collapsing whitespace, per example."""

# The module, not its class: `evaluate` serves the first metric class it finds here.
from components.evaluate.metrics import pairwise


def _norm(text):
    return " ".join(text.lower().split())


class ExactMatch(pairwise.PairwiseMetric):
    DESCRIPTION = "1.0 where the normalised prediction equals the normalised reference."

    def _compute(self, predictions, references):
        hits = [float(_norm(p) == _norm(r)) for p, r in zip(predictions, references, strict=True)]
        return {"exact_match": sum(hits) / max(len(hits), 1), "per_example": hits}
