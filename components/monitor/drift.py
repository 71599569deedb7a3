"""Prompt drift: do live prompts still look like the prompts the model was trained on?

Two tests, both cheap enough to run every monitor cycle on a CPU:
- length: two-sample Kolmogorov-Smirnov test on prompt lengths in words;
- text: a domain classifier (TF-IDF + logistic regression) that tries to tell live prompts from
  training prompts. Its cross-validated ROC AUC is about 0.5 when it cannot (no drift) and
  near 1.0 when live traffic is about something else. The words that give live prompts away
  are reported, so a person can see *what* drifted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from components.domain import DomainModel

MAX_REFERENCE = 2000


@dataclass(frozen=True)
class DriftReport:
    live: int
    reference: int
    median_words_live: float
    median_words_reference: float
    length_ks: float
    length_p_value: float
    domain_auc: float
    live_terms: list[str] = field(default_factory=list)
    # the share of live prompts the router sends away from the champion (when it routes)
    out_of_domain_share: float | None = None


def _words(texts: list[str]) -> list[int]:
    return [len(t.split()) for t in texts]


def domain_classifier_auc(
    reference: list[str], live: list[str], seed: int = 0
) -> tuple[float, list[str]]:
    """Cross-validated ROC AUC of telling `live` from `reference`, and the top live terms."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline

    texts = reference + live
    labels = np.array([0] * len(reference) + [1] * len(live))
    model = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2),
        LogisticRegression(class_weight="balanced", max_iter=2000),
    )
    folds = StratifiedKFold(n_splits=min(5, len(live)), shuffle=True, random_state=seed)
    scores = cross_val_predict(model, texts, labels, cv=folds, method="predict_proba")[:, 1]
    auc = float(roc_auc_score(labels, scores))
    model.fit(texts, labels)
    vectorizer, classifier = model.steps[0][1], model.steps[1][1]
    terms = vectorizer.get_feature_names_out()
    top = np.argsort(classifier.coef_[0])[::-1][:8]
    return auc, [str(terms[i]) for i in top if classifier.coef_[0][i] > 0]


def prompt_drift(
    reference: list[str], live: list[str], seed: int = 0, domain: DomainModel | None = None
) -> DriftReport:
    """Both drift tests, and with the router's `domain` the share of live prompts it sends
    away; `live` needs at least 2 prompts (the caller sets a real minimum)."""
    import random
    import statistics

    from scipy.stats import ks_2samp

    if len(live) < 2 or len(reference) < 2:
        raise ValueError("drift needs at least 2 live and 2 reference prompts")
    if len(reference) > MAX_REFERENCE:
        reference = random.Random(seed).sample(reference, MAX_REFERENCE)
    live_words, reference_words = _words(live), _words(reference)
    ks = ks_2samp(live_words, reference_words)
    auc, terms = domain_classifier_auc(reference, live, seed)
    return DriftReport(
        live=len(live),
        reference=len(reference),
        median_words_live=float(statistics.median(live_words)),
        median_words_reference=float(statistics.median(reference_words)),
        length_ks=round(float(ks.statistic), 4),
        length_p_value=float(ks.pvalue),
        domain_auc=round(auc, 4),
        live_terms=terms,
        out_of_domain_share=None if domain is None else domain.out_of_domain_share(live),
    )
