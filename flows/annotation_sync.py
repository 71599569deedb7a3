"""Annotation sync: send bad answers to Label Studio, bring finished reviews back as data.

    python -m flows.annotation_sync --profile cpu-small

or the deployment `annotation-sync/<profile>`. Each run pushes the thumbs-down and
low-confidence answers that are not in the review project yet, then turns approved and
corrected reviews, and (under `memory.trust: feedback`) corrections users sent with
`/feedback`, into the next version of the curated data (see components/data/curated.py) that
the next training run ingests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from components.annotate.review import ReviewProject, curated_items, review_candidates
from components.config import PipelineConfig, load_profile
from components.data.curated import curate, summary, user_corrections
from components.inference.store import InferenceStore
from components.memory.store import CorrectionMemory, remember_reviews
from components.paths import curated_dir
from flows.reports import slug


@task(retries=2, retry_delay_seconds=[5, 20])
def connect(title: str) -> ReviewProject:
    return ReviewProject.connect(title)


@task(cache_policy=NO_CACHE)  # a push to Label Studio is a side effect, never a cached result
def push_candidates(project: ReviewProject, config: PipelineConfig, since: float) -> int:
    with InferenceStore() as store:
        answers = store.answers_since(since)
    memory = CorrectionMemory(config.memory) if config.memory.enabled else None
    try:
        siblings_of = memory.siblings_of if memory is not None else None
        candidates = review_candidates(answers, config.monitor.low_confidence, siblings_of)
    finally:
        if memory is not None:
            memory.close()
    return project.push(candidates, config.review.max_tasks_per_sync)


@flow(name="annotation-sync", log_prints=True)
def annotation_sync(profile: str = "cpu-small", lookback_days: float = 30.0) -> dict:
    """Push answers to review, pull finished reviews, write curated training data."""
    config = load_profile(profile)
    since = time.time() - lookback_days * 86400
    project = connect(config.review.project_title)
    pushed = push_candidates(project, config, since)
    items, verdicts = curated_items(project.reviews())
    corrections = task(user_corrections)(config, since)
    result = task(curate)(config, items + corrections.items, corrections.policy)
    remembered = task(remember_reviews)(config.memory, items)
    folder = curated_dir(config.data.feedback_dir)
    report = {
        "project": project.url,
        "pushed": pushed,
        "verdicts": dict(verdicts),
        "curated": asdict(result),
        "curated_versions": summary(folder),
        "memory_new": remembered,
    }
    create_markdown_artifact(
        "\n".join(
            [
                f"## Annotation sync for `{config.name}`",
                f"- review project: {project.url}",
                f"- answers pushed for review: **{pushed}**",
                "- finished reviews: "
                + (", ".join(f"{k} {v}" for k, v in sorted(verdicts.items())) or "none"),
                f"- new curated examples: **{result.written}**"
                + (f" in `{result.path}`" if result.path else ""),
                "- not used: "
                + (", ".join(f"{k} {v}" for k, v in result.skipped.items()) or "none"),
                f"- curated folder `{folder}`: {len(report['curated_versions'])} versions, "
                f"{sum(report['curated_versions'].values())} examples",
                f"- new correction-memory entries (served at once): **{remembered}**",
            ]
        ),
        key=f"annotation-{slug(config.name)}",
        description="Label Studio review and curated data",
    )
    print(
        f"pushed {pushed} answers to {project.url}; reviews {dict(verdicts)}; "
        f"curated {result.written} new examples" + (f" -> {result.path}" if result.path else "")
    )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.annotation_sync")
    parser.add_argument("--profile", default="cpu-small")
    parser.add_argument("--lookback-days", type=float, default=30.0)
    args = parser.parse_args(argv)
    result = annotation_sync(profile=args.profile, lookback_days=args.lookback_days)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
