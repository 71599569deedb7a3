"""Routing measured: the profile's champion's domain (its training prompts) judged on prompts it
was never trained on: the frozen test split should stay with the champion, the drift prompts
(`data/seed/drift_prompts.jsonl`) should be sent away. Prints the accuracy at the profile's
`serve.routing.min_similarity` and around it, so a new domain can choose its own:

    .venv/bin/python -m benchmarks.routing --profile cpu-small
"""

from __future__ import annotations

import argparse

import numpy as np

from components.config import load_profile
from components.data.ingest import load_frozen_test
from components.domain import DomainModel
from components.model.embedding import sentence_embedder
from components.paths import REPO_ROOT
from components.records import read_jsonl
from components.registry.aliases import current_champion
from components.registry.register import training_prompts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.routing", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--profile", default="cpu-small")
    parser.add_argument(
        "--off-topic",
        default=str(REPO_ROOT / "data/seed/drift_prompts.jsonl"),
        help="JSONL of {'prompt': ...} rows that should not reach the champion",
    )
    args = parser.parse_args(argv)

    config = load_profile(args.profile)
    champion = current_champion(config.registry.model_name)
    if champion is None:
        raise SystemExit(f"no champion for {config.registry.model_name}: run make train first")
    threshold = config.serve.routing.min_similarity
    domain = DomainModel(
        training_prompts(champion.run_id),
        sentence_embedder(config.memory.embedding_model),
        threshold,
    )
    inside = domain.similarities([e.prompt() for e in load_frozen_test(config.data.test_path)])
    outside = domain.similarities([r["prompt"] for r in read_jsonl(REPO_ROOT / args.off_topic)])
    print(
        f"{config.registry.model_name} v{champion.version}: {domain.size} training prompts; "
        f"held out: {len(inside)} frozen test prompts (in), {len(outside)} off-topic (out)"
    )
    print(
        f"similarity to the nearest training prompt: test min {inside.min():.3f}, "
        f"off-topic max {outside.max():.3f}"
    )
    print(f"{'min_similarity':>15}{'test kept':>12}{'off-topic away':>16}{'accuracy':>10}")
    for value in sorted({*np.round(np.arange(0.2, 0.41, 0.02), 2), threshold}):
        kept, away = int((inside >= value).sum()), int((outside < value).sum())
        accuracy = (kept + away) / (len(inside) + len(outside))
        mark = "  <- profile" if value == threshold else ""
        print(
            f"{value:>15.2f}{kept:>8}/{len(inside)}{away:>12}/{len(outside)}{accuracy:>10.3f}{mark}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
