"""The whole flywheel once, on embedded defaults: `make demo` (PROFILE=tiny for a quick run).

1. train the profile and promote a champion (kept from an earlier demo if there is one);
2. serve it with `bentoml serve` through the deploy flow; for the demo the correction memory
   trusts users' corrections (`memory.trust=feedback`), so no reviewer is needed;
3. simulated users ask in-domain questions, read the answers and rate them (they asked
   because they do not know: they send no corrections);
4. the monitor looks: nothing to do (it only reports here; step 7 acts);
5. traffic shifts to questions about the team's own setup (`data/seed/demo_facts.jsonl`,
   kept apart from the frozen split) that the model cannot know: users rate down and, knowing
   their setup, send the right answer as a correction half of the time;
6. the next askers put the same questions in their own words: the memory answers at once;
7. the monitor decides to retrain and says why; the retrain learns the corrections, the
   two-sided gate judges it on the frozen split and the live set, and the deploy flow swaps a
   promoted version in (retiring the memory entries its weights now state);
8. the same users ask again: the thumbs-down rate on the shifted traffic before and after,
   with the memory and with the model alone (`x-flywheel-memory: off`);
9. it prints where to look, and stops what it started.

The simulated users' judging rule is in `scripts/traffic.py`.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from components.config import OVERRIDES_ENV, PipelineConfig, load_profile
from components.paths import flywheel_home, resolve_path, tracking_uri
from components.records import read_jsonl
from components.registry.aliases import current_champion
from components.registry.tracking import configure_mlflow
from components.serving.deploy import stop_service
from components.settings import settings
from flows.annotation_sync import annotation_sync
from flows.deploy import deploy
from flows.monitor import monitor, service_url, state_path
from flows.reports import describe
from flows.training_pipeline import training_pipeline
from scripts.traffic import Exchange, Question, down_rate, rate, send

DEMO_SETTINGS = "memory.trust=feedback"  # users' corrections enter the memory at once
FACTS_PATH = "data/seed/demo_facts.jsonl"


def step(number: int, text: str) -> float:
    print(f"\n=== {number}. {text}", flush=True)
    return time.perf_counter()


def done(started: float, text: str = "") -> None:
    print(f"    ... {text}{' ' if text else ''}({time.perf_counter() - started:.0f} s)", flush=True)


def in_domain_questions(config: PipelineConfig, n: int, seed: int) -> list[Question]:
    """Questions from the profile's instruction sources, with their answers as references."""
    questions = [
        Question(r["instruction"], r["output"])
        for s in config.data.sources
        if s.path.endswith(".jsonl")
        for r in read_jsonl(resolve_path(s.path))
        if r.get("instruction") and r.get("output")
    ]
    return random.Random(seed).sample(questions, min(n, len(questions)))


def demo_facts() -> list[dict[str, Any]]:
    return read_jsonl(resolve_path(FACTS_PATH))


def shifted_questions(askers: int) -> list[Question]:
    """Each fact's own question, asked by `askers` users."""
    return [
        Question(f["question"], f["answer"], f["key"]) for f in demo_facts() for _ in range(askers)
    ]


def rephrased_questions() -> list[Question]:
    """The same facts in the next askers' own words."""
    return [Question(p, f["answer"], f["key"]) for f in demo_facts() for p in f["rephrasings"]]


def shares(exchanges: list[Exchange]) -> str:
    hits = sum(e.memory == "hit" for e in exchanges)
    return f"thumbs-down {down_rate(exchanges):.0%} of {len(exchanges)}, memory hits {hits}"


def champion_or_train(profile: str, config: PipelineConfig) -> tuple[str, bool]:
    configure_mlflow()
    champion = current_champion(config.registry.model_name)
    if champion is not None:
        print(f"    {config.registry.model_name} v{champion.version} is already champion: kept")
        return str(champion.version), False
    summary = training_pipeline(profile=profile)
    if not summary["promoted"]:
        raise SystemExit(f"the first model was not promoted: {summary['reason']}")
    return str(summary["version"]), True


def served_version(url: str) -> str:
    import httpx

    return str(httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["version"])


def print_decision(outcome: dict[str, Any]) -> None:
    print("\n".join(f"    {line}" for line in describe(outcome["decision"]).splitlines()))


def where_to_look(config: PipelineConfig, url: str, label_studio: str | None) -> None:
    print("\n=== Where to look")
    print(
        f"    MLflow UI:     mlflow ui --backend-store-uri {tracking_uri()}  -> http://127.0.0.1:5000"
    )
    print(
        f"    Prefect UI:    PREFECT_HOME={os.environ.get('PREFECT_HOME', '~/.prefect')} "
        "prefect server start  -> http://127.0.0.1:4200"
    )
    print(f"    service:       {url}  (OpenAI API at {url}/v1; metrics at {url}/metrics)")
    print(f"    playground:    {url}/   (the demo stops the service; `make serve` starts it)")
    if label_studio:
        print(f"    Label Studio:  {label_studio}")
    print(f"    state:         {flywheel_home()}")


def run(profile: str, n_requests: int, keep_serving: bool) -> dict[str, Any]:
    began = time.perf_counter()
    config = load_profile(profile)
    url = service_url(config)
    max_tokens = min(24, config.serve.default_max_new_tokens)
    print(f"Flywheel demo: profile {config.name}, model {config.registry.model_name}, {url}")
    print(f"    settings for the demo: {settings().profile_overrides}")

    state = state_path(config)
    if state.is_file():  # a fresh monitor: no cooldown or baseline left from an earlier demo
        state.unlink()

    t = step(1, "Train and promote a champion")
    version, trained = champion_or_train(profile, config)
    done(t, f"champion v{version}")

    t = step(2, "Serve it (deploy flow: bentoml serve, smoke test)")
    deployed = deploy(config.registry.model_name, version, config)
    started_service = deployed["action"] == "started"
    done(t, f"{deployed['action']} {deployed['url']}, serving v{served_version(url)}")
    shifted = shifted_questions(1) + rephrased_questions()
    figures: dict[str, dict[str, float]] = {}
    try:
        t = step(3, f"In-domain traffic: {n_requests} questions; users judge and rate")
        calm = send(url, in_domain_questions(config, n_requests, seed=1), max_tokens)
        counts = rate(url, calm, correction_share=0.0, seed=1)  # they asked: no better answer
        done(t, f"{len(calm)} answers, feedback {dict(counts)}")
        print(f"    e.g. Q: {calm[0].question.prompt}\n         A: {calm[0].text[:150]}")

        t = step(4, "Monitor")
        first = monitor(profile=profile, retrain="off")  # a look only: step 7 acts
        print_decision(first)
        done(t)

        t = step(5, "Traffic shifts to the team's own setup, which the model cannot know")
        asked = send(url, shifted_questions(2), max_tokens)
        counts = rate(url, asked, seed=2)
        done(t, f"{shares(asked)}; feedback {dict(counts)}")
        print(f"    e.g. Q: {asked[0].question.prompt}\n         A: {asked[0].text[:150]}")
        print(f"         the user corrects: {asked[0].question.reference}")

        t = step(6, "The next askers, many in their own words: the memory answers at once")
        with_memory = send(url, shifted, max_tokens)
        alone = send(url, shifted, max_tokens, memory="off")  # judged, not rated
        counts = rate(url, with_memory, seed=3)
        figures[f"v{version} (before)"] = phase_figures(with_memory, alone)
        done(t, f"with the memory {shares(with_memory)}; feedback {dict(counts)}")
        hit = next((e for e in with_memory if e.memory == "hit"), None)
        if hit:
            print(f"    e.g. Q: {hit.question.prompt}\n         A: {hit.text[:150]} (memory)")

        t = step(7, "Monitor: decide, retrain on the corrections, two-sided gate, swap")
        second = monitor(profile=profile, wait_for_retrain=True)
        print_decision(second)
        retrain = second.get("retrain", {})
        summary = retrain.get("summary") or {}
        if second.get("curated"):
            print(f"    curated feedback: {second['curated']}")
        if summary:
            verdict = "promoted" if summary["promoted"] else "not promoted"
            print(f"    retrain -> v{summary['version']} {verdict} ({summary['gate_rule']} rule)")
            print(f"    gate: {summary['reason']}")
        now_serving = served_version(url)
        print(f"    the service now answers with v{now_serving}")
        done(t)

        t = step(8, "The same users ask again")
        with_memory = send(url, shifted, max_tokens)
        alone = send(url, shifted, max_tokens, memory="off")
        counts = rate(url, with_memory, seed=4)
        figures[f"v{now_serving} (after)"] = phase_figures(with_memory, alone)
        done(t, f"with the memory {shares(with_memory)}; feedback {dict(counts)}")
        print_before_after(figures, len(shifted))

        label_studio = None
        if "label_studio_url" in settings().model_fields_set:
            t = step(9, "Label Studio: push the thumbs-down answers for review")
            synced = annotation_sync(profile=profile)
            label_studio = synced["project"]
            done(t, f"{synced['pushed']} answers pushed to {label_studio}")
    finally:
        if started_service and not keep_serving:
            stop_service()
            print("\n    stopped the service the demo started")
    where_to_look(config, url, label_studio)
    seconds = time.perf_counter() - began
    print(f"\nDemo finished in {seconds / 60:.1f} min.")
    return {
        "profile": config.name,
        "champion": version,
        "trained_first_model": trained,
        "first_decision": first["decision"],
        "second_decision": second["decision"],
        "retrain": retrain,
        "curated": second.get("curated"),
        "serving_version": now_serving,
        "shifted_down_rate": figures,
        "seconds": round(seconds, 1),
    }


def phase_figures(with_memory: list[Exchange], alone: list[Exchange]) -> dict[str, float]:
    return {
        "memory": down_rate(with_memory),
        "alone": down_rate(alone),
        "memory_hits": sum(e.memory == "hit" for e in with_memory),
    }


def print_before_after(figures: dict[str, dict[str, float]], asked: int) -> None:
    print(f"\n    thumbs-down on the shifted traffic ({asked} questions, the users' rule):")
    print(f"    {'':<14}{'with the memory':>17}{'model alone':>13}")
    for name, rates in figures.items():
        print(f"    {name:<14}{rates['memory']:>17.0%}{rates['alone']:>13.0%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--profile", default="cpu-small")
    parser.add_argument(
        "--port", type=int, default=None, help="serve here (default: the profile's)"
    )
    parser.add_argument("--requests", type=int, default=30, help="in-domain questions in step 3")
    parser.add_argument("--keep-serving", action="store_true", help="leave the service running")
    parser.add_argument("--json", type=Path, default=None, help="also write the outcome here")
    args = parser.parse_args(argv)
    # The demo's settings (and the port), for every stage, in this process and its children.
    chosen = [settings().profile_overrides, DEMO_SETTINGS]
    if args.port is not None:
        chosen.append(f"serve.port={args.port}")
    os.environ[OVERRIDES_ENV] = " ".join(s for s in chosen if s)
    outcome = run(args.profile, args.requests, args.keep_serving)
    if args.json:
        import json

        args.json.write_text(json.dumps(outcome, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
