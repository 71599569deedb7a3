"""The whole flywheel once, on embedded defaults: `make demo` (PROFILE=tiny for a quick run).

1. train the profile and promote a champion (kept from an earlier demo if there is one);
2. serve it with `bentoml serve` through the deploy flow;
3. simulated users send in-domain questions and rate most answers up;
4. the monitor runs: nothing to do;
5. traffic shifts to off-topic prompts, rated mostly down, some with a correction;
6. the monitor runs again: it decides to retrain and says why; the retrain ingests the
   curated corrections, is evaluated against base and champion, is promoted only if better,
   and if promoted is swapped into the running service;
7. it prints where to look, and stops what it started.
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
from components.records import read_jsonl
from scripts.traffic import rate, send

SCOPE_REPLY = (
    "I can only help with Flywheel: preparing data, fine-tuning, evaluating, serving and "
    "monitoring your models. Please ask that question somewhere else."
)


def step(number: int, text: str) -> float:
    print(f"\n=== {number}. {text}", flush=True)
    return time.perf_counter()


def done(started: float, text: str = "") -> None:
    print(f"    ... {text}{' ' if text else ''}({time.perf_counter() - started:.0f} s)", flush=True)


def in_domain_prompts(config: PipelineConfig, n: int, seed: int) -> list[str]:
    from components.paths import resolve_path

    prompts = [
        r["instruction"]
        for s in config.data.sources
        if s.path.endswith(".jsonl")
        for r in read_jsonl(resolve_path(s.path))
        if "instruction" in r
    ]
    return random.Random(seed).sample(prompts, min(n, len(prompts)))


def off_topic_prompts(n: int, seed: int) -> list[str]:
    from components.paths import resolve_path

    prompts = [r["prompt"] for r in read_jsonl(resolve_path("data/seed/drift_prompts.jsonl"))]
    return random.Random(seed).sample(prompts, min(n, len(prompts)))


def champion_or_train(profile: str, config: PipelineConfig) -> tuple[str, bool]:
    from components.registry.register import current_champion
    from components.registry.tracking import configure_mlflow
    from flows.training_pipeline import training_pipeline

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
    from flows.monitor import describe

    print("\n".join(f"    {line}" for line in describe(outcome["decision"]).splitlines()))


def where_to_look(config: PipelineConfig, url: str, label_studio: str | None) -> None:
    from components.paths import flywheel_home, tracking_uri

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
    from components.serving.deploy import stop_service
    from flows.annotation_sync import annotation_sync
    from flows.deploy import deploy
    from flows.monitor import monitor, service_url, state_path

    began = time.perf_counter()
    config = load_profile(profile)
    url = service_url(config)
    max_tokens = min(24, config.serve.default_max_new_tokens)
    print(f"Flywheel demo: profile {config.name}, model {config.registry.model_name}, {url}")

    state = state_path(config)
    if state.is_file():  # a fresh monitor: no cooldown or baseline left from an earlier demo
        state.unlink()

    t = step(1, "Train and promote a champion")
    version, trained = champion_or_train(profile, config)
    done(t, f"champion v{version}")

    t = step(2, "Serve it (deploy flow: Bento, bentoml serve, smoke test)")
    deployed = deploy(config.registry.model_name, version, profile)
    started_service = deployed["action"] == "started"
    done(t, f"{deployed['action']} {deployed['url']}, serving v{served_version(url)}")
    try:
        t = step(3, f"In-domain traffic: {n_requests} questions, simulated users rate ~90% up")
        calm = send(url, in_domain_prompts(config, n_requests, seed=1), max_tokens)
        counts = rate(url, calm, down_share=0.1, seed=1)
        done(t, f"{len(calm)} answers, feedback {counts}")
        print(f"    e.g. Q: {calm[0].prompt}\n         A: {calm[0].text[:150]}")

        t = step(4, "Monitor")
        first = monitor(profile=profile)
        print_decision(first)
        done(t)

        t = step(5, f"Traffic shifts: {n_requests} off-topic prompts, ~80% rated down")
        shifted = send(url, off_topic_prompts(n_requests, seed=2), max_tokens)
        counts = rate(url, shifted, down_share=0.8, correction=SCOPE_REPLY, seed=2)
        done(t, f"{len(shifted)} answers, feedback {counts}")
        print(f"    e.g. Q: {shifted[0].prompt}\n         A: {shifted[0].text[:150]}")

        t = step(6, "Monitor: decide, retrain with the curated feedback, gate, swap")
        second = monitor(profile=profile, wait_for_retrain=True)
        print_decision(second)
        retrain = second.get("retrain", {})
        summary = retrain.get("summary") or {}
        if second.get("curated"):
            print(f"    curated feedback: {second['curated']}")
        if summary:
            verdict = "promoted" if summary["promoted"] else "not promoted"
            print(f"    retrain -> v{summary['version']} {verdict}: {summary['reason']}")
        now_serving = served_version(url)
        print(f"    the service now answers with v{now_serving}")
        done(t)

        label_studio = None
        if os.environ.get("LABEL_STUDIO_URL"):
            t = step(7, "Label Studio: push the thumbs-down answers for review")
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
        "seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--profile", default="cpu-small")
    parser.add_argument(
        "--port", type=int, default=None, help="serve here (default: the profile's)"
    )
    parser.add_argument("--requests", type=int, default=30, help="prompts per traffic phase")
    parser.add_argument("--keep-serving", action="store_true", help="leave the service running")
    parser.add_argument("--json", type=Path, default=None, help="also write the outcome here")
    args = parser.parse_args(argv)
    if args.port is not None:  # every stage of the demo, in this process and its children
        settings = os.environ.get(OVERRIDES_ENV, "")
        os.environ[OVERRIDES_ENV] = f"{settings} serve.port={args.port}".strip()
    outcome = run(args.profile, args.requests, args.keep_serving)
    if args.json:
        import json

        args.json.write_text(json.dumps(outcome, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
