"""Toxic and profane text, recognised offline by the classifier the `alt-profanity-check`
package ships (a linear model over words, trained on labelled toxic comments; no download).

Cleaning drops the training examples it flags (`clean.max_profanity`), and the trust policy
refuses the corrections it flags (`memory.max_profanity`): the probability at or over which a
text counts as toxic or profane.
"""

from __future__ import annotations

from collections.abc import Sequence


def profanity(texts: Sequence[str]) -> list[float]:
    """The probability that each text is toxic or profane."""
    if not texts:
        return []
    from profanity_check import predict_prob  # scikit-learn loads only when text is checked

    return [float(p) for p in predict_prob(list(texts))]
