"""Both speeds of learning from corrections, through the public API of a served champion.

In a fresh home (the model cache is shared):
1. the profile's first champion is trained, promoted and served by the deploy flow, with
   `memory.trust=feedback`;
2. speed 1 (`benchmarks.memory_recall.measure`): each fact's question is asked and its
   correction sent with `POST /feedback`; then the question and a rephrasing are asked again
   (stated when the fact's key is in the answer), and unrelated prompts must miss the memory;
3. `make monitor`: the monitor decides, the retrain learns the corrections, the two-sided gate
   judges it, the deploy flow swaps a promoted version in;
4. speed 2: the served version is asked every question and rephrasing with
   `x-flywheel-memory: off`. Rephrasings whose step-2 request was held out of training (or was
   not answered from the memory, so never reached the live set) count as never seen.

    .venv/bin/python -m benchmarks.two_speeds --facts path/to/facts.jsonl --profile cpu-small

Figures are printed and written as JSON into the run's home under `$FLYWHEEL_HOME/benchmarks/`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.homes import use_fresh_home
from benchmarks.memory_recall import ask, measure, unrelated_prompts
from components.config import OVERRIDES_ENV, load_profile
from components.data.curated import held_out
from components.paths import REPO_ROOT
from components.records import read_jsonl
from components.serving.deploy import stop_service


def weights_alone(url: str, facts: list[dict], never_seen: list[bool]) -> dict:
    """Facts the served weights state with the memory off."""
    same = [f["key"].lower() in ask(url, f["q"], 40, "off")[1]["text"].lower() for f in facts]
    rephrased = [f["key"].lower() in ask(url, f["p"], 40, "off")[1]["text"].lower() for f in facts]
    unseen = [r for r, n in zip(rephrased, never_seen, strict=True) if n]
    return {
        "same_question": sum(same),
        "rephrased": sum(rephrased),
        "rephrased_never_seen": sum(unseen),
        "never_seen": len(unseen),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.two_speeds", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--facts", type=Path, required=True, help="JSONL of {q, p, a, key}")
    parser.add_argument("--profile", default="cpu-small")
    parser.add_argument("--port", type=int, default=3302)
    args = parser.parse_args(argv)

    facts = read_jsonl(args.facts)
    # A fresh registry, store, memory and curated folder, and the service's own homes in it.
    home = use_fresh_home(
        "two-speeds", **{OVERRIDES_ENV: f"memory.trust=feedback serve.port={args.port}"}
    )
    os.environ.update(PREFECT_HOME=str(home / "prefect"), BENTOML_HOME=str(home / "bentoml"))

    # Imported once the fresh home is set: Prefect reads its settings when it is imported.
    from flows.deploy import deploy
    from flows.training_pipeline import training_pipeline

    config = load_profile(args.profile)
    url = f"http://127.0.0.1:{args.port}"
    started = time.perf_counter()
    first = training_pipeline(profile=args.profile)
    if not first["promoted"]:
        raise SystemExit(f"the first model was not promoted: {first['reason']}")
    deploy(first["model_name"], first["version"], load_profile(args.profile), port=args.port)
    figures: dict = {"facts": len(facts), "first_version": first["version"]}
    try:
        figures["weights_alone"] = {"first": weights_alone(url, facts, [True] * len(facts))}
        figures["memory"] = measure(url, facts, unrelated_prompts())
        retrain_started = time.perf_counter()
        monitor = subprocess.run(
            ["make", "monitor", f"PROFILE={args.profile}"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        )
        (home / "monitor.log").write_text(monitor.stdout + monitor.stderr)
        figures["monitor_seconds"] = round(time.perf_counter() - retrain_started)
        if monitor.returncode != 0:
            raise SystemExit(f"make monitor failed; see {home / 'monitor.log'}")
        served = ask(url, "hello", 1, "off")[1]["model_version"]
        figures["served_version"] = served
        fraction = config.eval.live_holdout_fraction
        never_seen = [
            r["memory"] != "hit" or held_out(r["request_id"], fraction)
            for r in figures["memory"]["rephrased_requests"]
        ]
        figures["weights_alone"]["after"] = weights_alone(url, facts, never_seen)
    finally:
        stop_service()
    figures["seconds"] = round(time.perf_counter() - started)
    memory, n = figures["memory"], len(facts)
    print(
        f"speed 1, the memory (v{first['version']}): {memory['same_question_stated']}/{n} "
        f"stated on the same question, {memory['rephrased_stated']}/{n} rephrased; unrelated "
        f"prompts answered from it: {memory['unrelated_hits']}/{memory['unrelated_prompts']}"
    )
    before, alone = figures["weights_alone"]["first"], figures["weights_alone"]["after"]
    print(
        f"before: v{first['version']} with the memory off states {before['same_question']}/{n} "
        f"on the same question, {before['rephrased']}/{n} rephrased"
    )
    print(
        f"speed 2, after make monitor ({figures['monitor_seconds'] / 60:.1f} min) v{served} "
        f"serves; with the memory off it states {alone['same_question']}/{n} on the same "
        f"question, {alone['rephrased']}/{n} rephrased, {alone['rephrased_never_seen']}/"
        f"{alone['never_seen']} of the rephrasings it never saw"
    )
    out = home / "two_speeds.json"
    out.write_text(json.dumps({"args": vars(args), "results": figures}, indent=1, default=str))
    print(f"gate and monitor: {home / 'monitor.log'}\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
