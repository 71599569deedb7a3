"""What the bundled metric modules share: `evaluate` metrics over (prediction, reference)
pairs that return every example's value beside the aggregate, for the bootstrap."""

from __future__ import annotations

import datasets
import evaluate


class PairwiseMetric(evaluate.Metric):
    """A metric of string pairs; a subclass says what it is and computes it."""

    DESCRIPTION = ""
    CITATION = ""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=self.DESCRIPTION,
            citation=self.CITATION,
            inputs_description="predictions and references: lists of strings of equal length",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )
