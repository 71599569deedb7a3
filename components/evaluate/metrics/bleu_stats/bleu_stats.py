"""Corpus BLEU (sacrebleu) plus each example's sufficient statistics.

Corpus BLEU is not an average of sentence scores, so bootstrapping it needs the per-example
n-gram counts, which are summed over each resample.
"""

import sacrebleu

# The module, not its class: `evaluate` serves the first metric class it finds here.
from components.evaluate.metrics import pairwise


class BleuStats(pairwise.PairwiseMetric):
    DESCRIPTION = "Corpus BLEU with per-example n-gram statistics for resampling."
    CITATION = "Post, A Call for Clarity in Reporting BLEU Scores, 2018."

    def _compute(self, predictions, references):
        bleu = sacrebleu.BLEU()
        stats = []
        for pred, ref in zip(predictions, references, strict=True):
            s = bleu.corpus_score([pred], [[ref]])
            stats.append([*s.counts, *s.totals, s.sys_len, s.ref_len])
        corpus = bleu.corpus_score(list(predictions), [list(references)])
        return {"bleu": corpus.score, "per_example": stats}
