"""Plots people would rather look at than read: loss curves and metric comparisons."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curve(points: list[tuple[float, float]], path: Path, title: str) -> Path:
    """Training loss by step, saved as a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    if points:
        steps, losses = zip(*points, strict=True)
        ax.plot(steps, losses, marker="o", markersize=3)
    ax.set(xlabel="step", ylabel="loss (answer tokens)", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_metric_comparison(
    scores: dict[str, dict[str, tuple[float, float, float]]], path: Path, title: str
) -> Path:
    """One panel per metric: each model's value with its confidence interval as error bars.

    `scores[metric][model] = (value, low, high)`.
    """
    plt = _pyplot()
    metrics = list(scores)
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(3.2 * len(metrics), 3.2), dpi=110, squeeze=False
    )
    for ax, metric in zip(axes[0], metrics, strict=True):
        models = list(scores[metric])
        values = [scores[metric][m][0] for m in models]
        errors = [
            [v - scores[metric][m][1] for m, v in zip(models, values, strict=True)],
            [scores[metric][m][2] - v for m, v in zip(models, values, strict=True)],
        ]
        ax.bar(
            models,
            values,
            yerr=errors,
            capsize=4,
            color=["#8da0cb", "#fc8d62", "#66c2a5"][: len(models)],
        )
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
