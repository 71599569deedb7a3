"""Correction-memory benchmark through the public API of a served model.

For every fact in a JSONL file of `{q, p, a, key}` (question, a rephrasing, the correction, a
string the correction states), it asks `q`, sends `a` as a correction with `POST /feedback`,
and then asks `q` and `p` again: a fact counts as stated when `key` is in the answer. Then
it asks unrelated prompts (the seed training, test and drift prompts) and counts how many the
memory answered (`x-flywheel-memory: hit`), which should be none. It starts
`bentoml serve` of the profile's champion with `memory.trust=feedback` in a fresh feedback
database, or loads `--url`:

    .venv/bin/python -m benchmarks.memory_recall --facts path/to/facts.jsonl --profile cpu-small

Figures are printed and written as JSON under `$FLYWHEEL_HOME/benchmarks/`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from components.config import OVERRIDES_ENV
from components.paths import REPO_ROOT, benchmarks_dir
from components.process import Server
from components.records import read_jsonl
from components.serving.deploy import serve_command, service_env


def unrelated_prompts() -> list[str]:
    """Prompts no correction is about: the seed data's training, test and drift prompts."""
    seed = REPO_ROOT / "data" / "seed"
    prompts = [r["instruction"] for r in read_jsonl(seed / "support.jsonl")]
    prompts += [r["instruction"] for r in read_jsonl(seed / "test.jsonl")]
    prompts += [r["prompt"] for r in read_jsonl(seed / "drift_prompts.jsonl")]
    return prompts


def ask(url: str, prompt: str, max_new_tokens: int, memory: str | None = None) -> tuple[str, dict]:
    body = {"prompt": prompt, "max_new_tokens": max_new_tokens}
    headers = {"x-flywheel-memory": memory} if memory else {}
    response = httpx.post(f"{url}/generate", json=body, headers=headers, timeout=300)
    response.raise_for_status()
    return response.headers["x-flywheel-memory"], response.json()


def measure(url: str, facts: list[dict], unrelated: list[str]) -> dict:
    rejected = []
    for fact in facts:
        _, first = ask(url, fact["q"], 8)
        feedback = httpx.post(
            f"{url}/feedback",
            json={"request_id": first["request_id"], "rating": "down", "correction": fact["a"]},
            timeout=60,
        ).json()
        if not str(feedback.get("memory", "")).startswith("kept"):
            rejected.append({"q": fact["q"], "memory": feedback.get("memory")})
    same = rephrased = 0
    misses, asked = [], []
    for fact in facts:
        key = fact["key"].lower()
        same += key in ask(url, fact["q"], 40)[1]["text"].lower()
        status, answer = ask(url, fact["p"], 40)
        asked.append({"p": fact["p"], "request_id": answer["request_id"], "memory": status})
        if key in answer["text"].lower():
            rephrased += 1
        else:
            misses.append({"p": fact["p"], "memory": status, "answer": answer["text"][:120]})
    false_hits = [p for p in unrelated if ask(url, p, 1)[0] == "hit"]
    n = len(facts)
    return {
        "facts": n,
        "same_question_stated": same,
        "rephrased_stated": rephrased,
        "same_question_rate": round(same / n, 3),
        "rephrased_rate": round(rephrased / n, 3),
        "unrelated_prompts": len(unrelated),
        "unrelated_hits": len(false_hits),
        "corrections_not_kept": rejected,
        "rephrased_misses": misses,
        "rephrased_requests": asked,
        "false_hits": false_hits[:20],
    }


@contextmanager
def memory_service(
    profile: str, port: int, run: Path, overrides: str = "", model_uri: str | None = None
) -> Iterator[str]:
    """`bentoml serve` of the profile's champion (or `model_uri`; `base`: the base model) with
    `memory.trust=feedback` and a feedback database (so a memory) of its own under `run`;
    yields its URL."""
    env = {
        **service_env(profile, model_uri),
        OVERRIDES_ENV: f"memory.trust=feedback {overrides}".strip(),
        "FLYWHEEL_FEEDBACK_DB": f"sqlite:///{run / 'feedback.db'}",
        "BENTOML_HOME": str(run / "bentoml"),
    }
    url = f"http://127.0.0.1:{port}"
    server = Server.start(
        "the service", serve_command(port), f"{url}/readyz", run / "service.log", env=env
    )
    try:
        server.wait_ready(900)  # the first start of a version converts it for the engine
        yield url
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.memory_recall", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--facts", type=Path, required=True, help="JSONL of {q, p, a, key}")
    parser.add_argument("--profile", default="cpu-small")
    parser.add_argument("--port", type=int, default=3301)
    parser.add_argument("--url", help="a running service with memory.trust=feedback instead")
    args = parser.parse_args(argv)

    facts = read_jsonl(args.facts)
    out_dir = benchmarks_dir()
    if args.url:
        figures = measure(args.url, facts, unrelated_prompts())
    else:
        run = out_dir / f"memory-{time.strftime('%Y%m%d-%H%M%S')}"
        with memory_service(args.profile, args.port, run) as url:
            figures = measure(url, facts, unrelated_prompts())
    print(
        f"{figures['facts']} facts: stated on the same question "
        f"{figures['same_question_stated']}/{figures['facts']}, on a rephrasing "
        f"{figures['rephrased_stated']}/{figures['facts']}; unrelated prompts answered from the "
        f"memory: {figures['unrelated_hits']}/{figures['unrelated_prompts']}"
    )
    for miss in figures["rephrased_misses"]:
        print(f"  missed: {miss['p']} ({miss['memory']})")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"memory_recall-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": vars(args), "results": figures}, indent=1, default=str))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
