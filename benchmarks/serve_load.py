"""Load benchmark: N concurrent clients for a fixed time against `bentoml serve`.

By default it serves the profile's champion on the OpenVINO engine and then on the transformers
reference (with adaptive batching), loads each at 1, 8, 32 and 64 concurrent clients, and then
measures the ceiling: the same converted champion driven in-process, without HTTP. It prints
one table and the service's share of the ceiling at each concurrency:

    .venv/bin/python -m benchmarks.serve_load --profile cpu-small --duration 30

Use `--url` to load an already running service instead. Figures are written as JSON under
`$FLYWHEEL_HOME/benchmarks/`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from components.config import OVERRIDES_ENV
from components.paths import REPO_ROOT, flywheel_home
from components.process import Server
from components.records import read_jsonl
from components.serving.deploy import serve_command, service_env


def batch_stats(url: str) -> tuple[float, float]:
    """(requests batched, batches formed) so far, from the service's /metrics."""
    total = count = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == "bentoml_service_adaptive_batch_size_sum":
                total += sample.value
            elif sample.name == "bentoml_service_adaptive_batch_size_count":
                count += sample.value
    return total, count


async def run_load(
    url: str, prompts: list[str], clients: int, duration: float, max_new_tokens: int
) -> dict:
    """Each client sends requests back to back until the time is up."""
    latencies: list[float] = []
    tokens = 0
    errors: Counter[str] = Counter()
    deadline = time.perf_counter() + duration

    async def client(index: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens
        i = index
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                response = await http.post(
                    f"{url}/generate",
                    json={"prompt": prompts[i % len(prompts)], "max_new_tokens": max_new_tokens},
                )
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                    tokens += response.json()["completion_tokens"]
                else:
                    errors[str(response.status_code)] += 1
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] += 1
            i += clients

    before = batch_stats(url)
    started = time.perf_counter()
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    elapsed = time.perf_counter() - started
    after = batch_stats(url)
    batches = after[1] - before[1]
    batch = round((after[0] - before[0]) / batches, 2) if batches else None
    return figures(latencies, tokens, elapsed, errors, batch)


def start_service(profile: str, runtime: str, port: int, folder: Path) -> Server:
    """`bentoml serve` with the profile's engine overridden (`reference`: transformers)."""
    engine = "transformers" if runtime == "reference" else runtime
    overrides = f"{os.environ.get(OVERRIDES_ENV, '')} serve.engine.name={engine}".strip()
    server = Server.start(
        f"the service ({runtime})",
        serve_command(port),
        f"http://127.0.0.1:{port}/readyz",
        folder / f"service-{runtime}.log",
        env={**service_env(profile), OVERRIDES_ENV: overrides},
    )
    server.wait_ready(600)  # the first start on an engine converts the champion
    return server


def engine_ceiling(
    profile: str, prompts: list[str], clients: int, duration: float, max_new_tokens: int
) -> dict:
    """The same converted champion on the OpenVINO engine in this process, no HTTP: each
    client thread sends its next request as soon as the last is answered."""
    import threading

    from components.config import load_profile
    from components.model.chat import load_tokenizer, render_chat
    from components.model.generation import GenerationRequest
    from components.serving.engine import OpenVINOEngine
    from components.serving.model import resolve_model_uri

    config = load_profile(profile)
    name, version = resolve_model_uri(f"models:/{config.registry.model_name}@champion")
    folder = (
        flywheel_home() / "serving" / name / version / f"openvino-{config.serve.engine.weights}"
    )
    tokenizer = load_tokenizer(str(folder), padding_side="left")
    engine = OpenVINOEngine(
        folder, tokenizer, config.serve.engine.kv_cache_gb, config.serve.engine.max_batched_tokens
    )
    requests = [
        GenerationRequest(render_chat(tokenizer, [{"role": "user", "content": p}]), max_new_tokens)
        for p in prompts
    ]
    latencies: list[float] = []
    tokens = [0]
    deadline = time.perf_counter() + duration

    def client(index: int) -> None:
        i = index
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            [answer] = engine.generate([requests[i % len(requests)]])
            latencies.append(time.perf_counter() - started)
            tokens[0] += answer.completion_tokens
            i += clients

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    engine.close()
    return figures(latencies, tokens[0], elapsed, Counter(), None)


def figures(
    latencies: list[float], tokens: int, elapsed: float, errors: Counter, batch: float | None
) -> dict:
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {
        "requests": len(latencies),
        "errors": sum(errors.values()),
        "seconds": round(elapsed, 1),
        "tokens_per_s": round(tokens / elapsed, 1),
        "p50_s": round(quantiles[49], 2),
        "p95_s": round(quantiles[94], 2),
        "p99_s": round(quantiles[98], 2),
        "mean_batch": batch,
        "errors_by_kind": dict(errors),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serve_load", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--profile", default="cpu-small")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load per run")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--port", type=int, default=3300)
    parser.add_argument(
        "--runtimes",
        nargs="+",
        default=["openvino", "reference"],
        choices=["openvino", "reference"],
        help="the engines to serve on",
    )
    parser.add_argument("--url", help="load this running service instead of starting one")
    args = parser.parse_args(argv)

    prompts = [row["instruction"] for row in read_jsonl(REPO_ROOT / "data/seed/test.jsonl")]
    results: dict[str, dict] = {}

    def load_all(name: str, url: str) -> None:
        for clients in args.clients:
            figures = asyncio.run(
                run_load(url, prompts, clients, args.duration, args.max_new_tokens)
            )
            results[f"{name} x{clients}"] = figures
            print(f"{name:<10} {clients:>3} clients: {figures}", flush=True)

    if args.url:
        load_all("service", args.url)
    else:
        logs = flywheel_home() / "benchmarks" / "logs"
        for runtime in args.runtimes:
            process = start_service(args.profile, runtime, args.port, logs)
            try:
                url = f"http://127.0.0.1:{args.port}"
                asyncio.run(run_load(url, prompts, 4, 5, 4))  # warm up
                load_all(runtime, url)
            finally:
                process.stop()
        if "openvino" in args.runtimes:  # the converted champion exists now
            for clients in args.clients:
                ceiling = engine_ceiling(
                    args.profile, prompts, clients, args.duration, args.max_new_tokens
                )
                results[f"ceiling x{clients}"] = ceiling
                print(f"ceiling    {clients:>3} clients: {ceiling}", flush=True)
    columns = ["tokens_per_s", "p50_s", "p95_s", "p99_s", "requests", "errors", "mean_batch"]
    print(f"\n{args.duration:.0f}s per run, {args.max_new_tokens} new tokens, concurrent clients")
    print(f"{'run':<16}" + "".join(f"{c:>14}" for c in columns))
    for name, row in results.items():
        print(f"{name:<16}" + "".join(f"{row[c]!s:>14}" for c in columns))
    for clients in args.clients:
        served, ceiling = results.get(f"openvino x{clients}"), results.get(f"ceiling x{clients}")
        if served and ceiling:
            share = served["tokens_per_s"] / max(ceiling["tokens_per_s"], 1e-9)
            results[f"openvino share of ceiling x{clients}"] = {"ratio": round(share, 3)}
            print(
                f"{clients:>3} clients: the service on OpenVINO reaches {share:.0%} of the engine"
            )
    out = flywheel_home() / "benchmarks" / f"serve_load-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
