"""Grounded answers measured: the profile's champion on the frozen test split, asked plainly
and with the docs' passages (the profile's `retrieval:` corpus and `top_k`, as the service
grounds a question), each metric with its bootstrap interval and the paired difference.

    .venv/bin/python -m benchmarks.grounding --profile cpu-small

Answers are greedy on the float32 reference and cached like the evaluation's (the plain ones
are usually in the cache already). Figures are written as JSON under
`$FLYWHEEL_HOME/benchmarks/`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

from components.config import load_profile
from components.data.ingest import load_frozen_test
from components.evaluate.evaluation import (
    METRICS,
    ModelSpec,
    bootstrap_indices,
    compare,
    model_answers,
    per_example_scores,
    summarize,
)
from components.paths import benchmarks_dir, flywheel_home
from components.registry.register import download_version
from components.retrieval.index import profile_index
from components.serving.loading import resolve_model_uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.grounding", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--profile", default="cpu-small")
    parser.add_argument("--top-k", type=int, help="passages per question (default: the profile's)")
    args = parser.parse_args(argv)

    config = load_profile(args.profile)
    index = profile_index(config)
    top_k = args.top_k or index.top_k
    examples = load_frozen_test(config.data.test_path)[: config.eval.max_examples]
    grounded = [
        replace(e, instruction=index.ground(e.prompt(), top_k)[0], input="") for e in examples
    ]
    name, version = resolve_model_uri(f"models:/{config.registry.model_name}@champion")
    references = [e.output for e in examples]
    per_example = {}
    home = flywheel_home()
    with tempfile.TemporaryDirectory(dir=home) as tmp:
        base_path, adapter_dir = download_version(name, version, Path(tmp))
        spec = ModelSpec(base_path, adapter_dir)
        for label, asked in (("plain", examples), ("grounded", grounded)):
            print(f"answering {len(asked)} frozen test prompts, {label} ...", flush=True)
            answers, likelihoods = model_answers(spec, asked, config.eval)
            per_example[label] = per_example_scores(answers, references, likelihoods)
    indices = bootstrap_indices(len(examples), config.eval.bootstrap_samples)
    scores = {
        label: summarize(values, indices, config.eval.confidence)
        for label, values in per_example.items()
    }
    differences = {
        metric: compare(
            per_example["grounded"],
            per_example["plain"],
            "plain",
            metric,
            indices,
            config.eval.confidence,
        )
        for metric in METRICS
    }
    print(
        f"\n{name} v{version}, {len(examples)} frozen test prompts, top_k={top_k}, "
        f"{len(index.passages)} passages ({index.excluded} left out for overlapping test "
        f"answers), {config.eval.confidence:.0%} bootstrap intervals"
    )
    print(f"{'metric':<12}{'plain':>24}{'grounded':>24}{'grounded - plain':>26}")
    for metric in METRICS:
        cells = [
            f"{s[metric]['value']:.3f} [{s[metric]['low']:.3f}, {s[metric]['high']:.3f}]"
            for s in (scores["plain"], scores["grounded"])
        ]
        d = differences[metric]
        change = f"{d.difference:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
        print(f"{metric:<12}{cells[0]:>24}{cells[1]:>24}{change:>26}")
    out = benchmarks_dir() / f"grounding-{args.profile}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": name,
                "version": version,
                "examples": len(examples),
                "top_k": top_k,
                "passages": len(index.passages),
                "excluded": index.excluded,
                "scores": scores,
                "differences": {m: vars(d) for m, d in differences.items()},
            },
            indent=1,
        )
    )
    print(f"figures: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
