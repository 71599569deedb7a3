"""Local `evaluate` metric modules, loaded by path so evaluation works offline.

`evaluate.load("rouge")` fetches the metric script from a hub; these modules carry their own
code and depend only on `rouge_score` and `sacrebleu` from PyPI. Each returns per-example
values, which the bootstrap confidence intervals need.
"""

from pathlib import Path

METRICS_DIR = Path(__file__).parent


def load_metric(name: str):
    """Load one of the bundled metric modules (`rouge_l`, `bleu_stats`, `exact_match`)."""
    import evaluate

    return evaluate.load(str(METRICS_DIR / name))
