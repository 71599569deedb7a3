"""Load benchmark: N concurrent clients for a fixed time against `bentoml serve`.

By default it starts the service twice, with adaptive batching and without (the profile's
`serve.batching`), runs the same load against each, and prints both and their ratio:

    .venv/bin/python -m benchmarks.serve_load --profile cpu-small --clients 32 --duration 60

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
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    batches = after[1] - before[1]
    return {
        "requests": len(latencies),
        "errors": sum(errors.values()),
        "seconds": round(elapsed, 1),
        "requests_per_s": round(len(latencies) / elapsed, 2),
        "tokens_per_s": round(tokens / elapsed, 1),
        "p50_s": round(quantiles[49], 2),
        "p95_s": round(quantiles[94], 2),
        "p99_s": round(quantiles[98], 2),
        "mean_batch_size": round((after[0] - before[0]) / batches, 2) if batches else None,
        "errors_by_kind": dict(errors),
    }


def start_service(profile: str, batching: bool, port: int, folder: Path) -> Server:
    """`bentoml serve` with the profile's serve.batching overridden."""
    server = Server.start(
        f"the service (batching {batching})",
        serve_command(port),
        f"http://127.0.0.1:{port}/readyz",
        folder / f"service-batching-{batching}.log",
        env={
            **service_env(profile),
            OVERRIDES_ENV: f"{os.environ.get(OVERRIDES_ENV, '')} serve.batching={batching}".strip(),
        },
    )
    server.wait_ready(300)
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serve_load", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--profile", default="cpu-small")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load per run")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--port", type=int, default=3300)
    parser.add_argument("--url", help="load this running service instead of starting one")
    args = parser.parse_args(argv)

    prompts = [row["instruction"] for row in read_jsonl(REPO_ROOT / "data/seed/test.jsonl")]
    results: dict[str, dict] = {}
    if args.url:
        results["service"] = asyncio.run(
            run_load(args.url, prompts, args.clients, args.duration, args.max_new_tokens)
        )
    else:
        logs = flywheel_home() / "benchmarks" / "logs"
        for batching in (True, False):
            process = start_service(args.profile, batching, args.port, logs)
            try:
                url = f"http://127.0.0.1:{args.port}"
                asyncio.run(run_load(url, prompts, 4, 5, 4))  # warm up
                results["batched" if batching else "unbatched"] = asyncio.run(
                    run_load(url, prompts, args.clients, args.duration, args.max_new_tokens)
                )
            finally:
                process.stop()
    header = f"{args.clients} clients, {args.duration:.0f}s, {args.max_new_tokens} new tokens"
    print(f"\n{header}\n{'run':<10}" + "".join(f"{k:>16}" for k in next(iter(results.values()))))
    for name, figures in results.items():
        print(f"{name:<10}" + "".join(f"{v!s:>16}" for v in figures.values()))
    if {"batched", "unbatched"} <= set(results):
        b, u = results["batched"], results["unbatched"]
        ratio = b["tokens_per_s"] / max(u["tokens_per_s"], 1e-9)
        results["ratio"] = {
            "tokens_per_s": round(ratio, 2),
            "p95_batched_over_unbatched": round(b["p95_s"] / max(u["p95_s"], 1e-9), 2),
        }
        print(
            f"\nadaptive batching: {ratio:.1f}x the generated tokens/s, p95 latency "
            f"{b['p95_s']}s vs {u['p95_s']}s"
        )
    out = flywheel_home() / "benchmarks" / f"serve_load-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
