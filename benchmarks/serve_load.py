"""Load benchmark: N concurrent clients for a fixed time against `bentoml serve`.

By default one run, side by side at 1, 8, 32 and 64 concurrent closed-loop clients:
- the service on the OpenVINO engine: whole answers (`/generate`), then streams
  (`/v1/chat/completions`, time to first token measured), the response cache off;
- the same service with the response cache on, on traffic that repeats its prompts;
- the service on the transformers reference (adaptive batching);
- llama.cpp's `llama-server` on the same champion (Q8_0), when `make llamacpp` built it;
- the ceiling: the same converted champion on the engine in-process, without HTTP.
It prints one table and the service's share of the ceiling at each concurrency:

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
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from components.config import OVERRIDES_ENV, load_profile
from components.model.chat import load_tokenizer, render_chat
from components.model.generation import GenerationRequest, load_for_inference
from components.paths import REPO_ROOT, benchmarks_dir, serving_dir
from components.process import Server
from components.records import read_jsonl
from components.registry.register import download_version
from components.serving.deploy import serve_command, service_env
from components.serving.engine import OpenVINOEngine
from components.serving.loading import resolve_model_uri

LLAMA_CPP = REPO_ROOT / ".llamacpp"  # `make llamacpp`: the source and build/bin/llama-server


class Refused(Exception):
    """An answer that was not a 200 (its status is the error's kind)."""


@dataclass
class Answer:
    tokens: int
    first_token_s: float | None = None  # streams only


Call = Callable[[httpx.AsyncClient, str], Awaitable[Answer]]


def generate_call(url: str, max_new_tokens: int) -> Call:
    async def call(http: httpx.AsyncClient, prompt: str) -> Answer:
        body = {"prompt": prompt, "max_new_tokens": max_new_tokens}
        response = await http.post(f"{url}/generate", json=body)
        if response.status_code != 200:
            raise Refused(str(response.status_code))
        return Answer(response.json()["completion_tokens"])

    return call


def openai_call(url: str, max_new_tokens: int, stream: bool, chat: bool = True) -> Call:
    """An OpenAI chat (or text) completion, of this service or llama-server, whole or
    streamed; a stream's time to first token is when its first piece of text arrives."""
    route = f"{url}/v1/chat/completions" if chat else f"{url}/v1/completions"

    async def call(http: httpx.AsyncClient, prompt: str) -> Answer:
        body: dict = {"max_tokens": max_new_tokens, "temperature": 0}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if not stream:
            response = await http.post(route, json=body)
            if response.status_code != 200:
                raise Refused(str(response.status_code))
            return Answer(response.json()["usage"]["completion_tokens"])
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        started, first, tokens = time.perf_counter(), None, 0
        async with http.stream("POST", route, json=body) as response:
            if response.status_code != 200:
                raise Refused(str(response.status_code))
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices") or []:
                    text = choice["delta"].get("content") if chat else choice.get("text")
                    if first is None and text:
                        first = time.perf_counter() - started
        return Answer(tokens, first)

    return call


def lookups(url: str, prefixes: tuple[str, ...]) -> Counter[str]:
    """Counters from the service's /metrics whose sample names start with `prefixes`."""
    totals: Counter[str] = Counter()
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name.startswith(prefixes):
                label = sample.labels.get("result", "")
                totals[f"{sample.name}:{label}" if label else sample.name] += sample.value
    return totals


BATCH = ("bentoml_service_adaptive_batch_size_sum", "bentoml_service_adaptive_batch_size_count")
CACHE = ("flywheel_response_cache_lookups_total",)


async def run_load(call: Call, prompts: list[str], clients: int, duration: float) -> dict:
    """Each client sends requests back to back until the time is up."""
    latencies: list[float] = []
    first_tokens: list[float] = []
    tokens = 0
    errors: Counter[str] = Counter()
    deadline = time.perf_counter() + duration

    async def client(index: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens
        i = index
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                answer = await call(http, prompts[i % len(prompts)])
                latencies.append(time.perf_counter() - started)
                tokens += answer.tokens
                if answer.first_token_s is not None:
                    first_tokens.append(answer.first_token_s)
            except Refused as refused:
                errors[str(refused)] += 1
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] += 1
            i += clients

    started = time.perf_counter()
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    return figures(latencies, tokens, time.perf_counter() - started, errors, first_tokens)


def served_load(url: str, call: Call, prompts: list[str], clients: int, duration: float) -> dict:
    """`run_load` on the service, with what its /metrics counted meanwhile: the mean
    adaptive batch, and the response cache's hit rate."""
    before = lookups(url, BATCH + CACHE)
    result = asyncio.run(run_load(call, prompts, clients, duration))
    counted = lookups(url, BATCH + CACHE) - before
    if batches := counted[BATCH[1]]:
        result["mean_batch"] = round(counted[BATCH[0]] / batches, 2)
    hits, misses = counted[f"{CACHE[0]}:hit"], counted[f"{CACHE[0]}:miss"]
    if hits + misses:
        result["cache_hit_rate"] = round(hits / (hits + misses), 3)
    return result


def start_service(profile: str, runtime: str, cache: bool, port: int, folder: Path) -> Server:
    """`bentoml serve` with the profile's engine overridden (`reference`: transformers)."""
    engine = "transformers" if runtime == "reference" else runtime
    settings = f"serve.engine.name={engine} serve.cache.enabled={str(cache).lower()}"
    overrides = f"{os.environ.get(OVERRIDES_ENV, '')} {settings}".strip()
    server = Server.start(
        f"the service ({runtime})",
        serve_command(port),
        f"http://127.0.0.1:{port}/readyz",
        folder / f"service-{runtime}{'-cached' if cache else ''}.log",
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

    config = load_profile(profile)
    name, version = resolve_model_uri(f"models:/{config.registry.model_name}@champion")
    folder = serving_dir(name, version) / f"openvino-{config.serve.engine.weights}"
    tokenizer = load_tokenizer(str(folder), padding_side="left")
    engine = OpenVINOEngine(folder, tokenizer, config.serve.engine)
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
    return figures(latencies, tokens[0], elapsed, Counter(), [])


def llama_server(profile: str, port: int, slots: int, folder: Path) -> Server | None:
    """llama.cpp's server on the champion merged and converted to GGUF Q8_0 (cached beside
    the OpenVINO weights), with `slots` parallel sequences; None when it is not built or
    the champion does not convert."""
    binary = LLAMA_CPP / "src" / "build" / "bin" / "llama-server"
    if not binary.is_file():
        print(f"llama.cpp: no {binary} (`make llamacpp` builds it); its row is left out")
        return None

    config = load_profile(profile)
    name, version = resolve_model_uri(f"models:/{config.registry.model_name}@champion")
    gguf = serving_dir(name, version) / "llamacpp-q8_0.gguf"
    if not gguf.is_file():
        with tempfile.TemporaryDirectory(dir=gguf.parent) as tmp:
            base, adapter = download_version(name, version, Path(tmp))
            model, tokenizer = load_for_inference(base, adapter, device="cpu")
            merged = Path(tmp) / "merged"
            model.save_pretrained(merged)
            tokenizer.save_pretrained(merged)
            script = LLAMA_CPP / "src" / "convert_hf_to_gguf.py"
            paths = [LLAMA_CPP / "src" / "gguf-py", LLAMA_CPP / "py"]  # its gguf, sentencepiece
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, paths))}
            command = [sys.executable, str(script), str(merged), "--outtype", "q8_0"]
            converted = subprocess.run([*command, "--outfile", str(gguf)], env=env)
            if converted.returncode != 0:
                print("llama.cpp: the GGUF conversion failed (above); its row is left out")
                return None
    command = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    # Each of the `slots` sequences gets 512 tokens of context (prompt and answer).
    command += ["-np", str(slots), "-c", str(512 * slots), "-t", str(os.cpu_count() or 2)]
    server = Server.start(
        "llama-server", command, f"http://127.0.0.1:{port}/health", folder / "llama.log"
    )
    server.wait_ready(300)
    return server


def figures(
    latencies: list[float], tokens: int, elapsed: float, errors: Counter, first_tokens: list[float]
) -> dict:
    def quantiles(values: list[float]) -> list[float]:
        return statistics.quantiles(values, n=100) if len(values) > 1 else [0.0] * 99

    q = quantiles(latencies)
    result = {
        "requests": len(latencies),
        "errors": sum(errors.values()),
        "seconds": round(elapsed, 1),
        "tokens_per_s": round(tokens / elapsed, 1),
        "p50_s": round(q[49], 2),
        "p95_s": round(q[94], 2),
        "p99_s": round(q[98], 2),
        "errors_by_kind": dict(errors),
    }
    if first_tokens:
        ttft = quantiles(first_tokens)
        result |= {"ttft_p50_s": round(ttft[49], 2), "ttft_p95_s": round(ttft[94], 2)}
    return result


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
        default=["openvino", "cached", "reference", "llamacpp"],
        choices=["openvino", "cached", "reference", "llamacpp"],
        help="what to load: the service on the engine (whole answers and streams), the same "
        "with the response cache on, the service on the reference, llama.cpp's server",
    )
    parser.add_argument("--url", help="load this running service instead of starting one")
    args = parser.parse_args(argv)

    prompts = [row["instruction"] for row in read_jsonl(REPO_ROOT / "data/seed/test.jsonl")]
    new_tokens = args.max_new_tokens
    url = args.url or f"http://127.0.0.1:{args.port}"
    results: dict[str, dict] = {}

    def load_all(name: str, call: Call, served: bool = True) -> None:
        for clients in args.clients:
            if served:
                result = served_load(url, call, prompts, clients, args.duration)
            else:
                result = asyncio.run(run_load(call, prompts, clients, args.duration))
            results[f"{name} x{clients}"] = result
            print(f"{name:<16} {clients:>3} clients: {result}", flush=True)

    def serving(runtime: str, cache: bool) -> Server:
        server = start_service(args.profile, runtime, cache, args.port, logs)
        asyncio.run(run_load(generate_call(url, 4), prompts[:4], 4, 5))  # warm up
        return server

    if args.url:
        load_all("service", generate_call(url, new_tokens))
        load_all("service stream", openai_call(url, new_tokens, stream=True))
        return report(args, results)
    logs = benchmarks_dir() / "logs"
    for runtime in args.runtimes:
        if runtime == "llamacpp":
            slots = max(args.clients)
            server = llama_server(args.profile, args.port, slots, logs)
            if server is not None:
                try:
                    load_all("llama.cpp", openai_call(url, new_tokens, stream=False), served=False)
                finally:
                    server.stop()
            continue
        server = serving("openvino" if runtime == "cached" else runtime, cache=runtime == "cached")
        try:
            if runtime == "cached":  # the test prompts over and over: repeats hit the cache
                load_all("openvino cached", generate_call(url, new_tokens))
            else:
                load_all(runtime, generate_call(url, new_tokens))
                if runtime == "openvino":
                    load_all("openvino stream", openai_call(url, new_tokens, stream=True))
        finally:
            server.stop()
    if "openvino" in args.runtimes:  # the converted champion exists now
        for clients in args.clients:
            ceiling = engine_ceiling(args.profile, prompts, clients, args.duration, new_tokens)
            results[f"ceiling x{clients}"] = ceiling
            print(f"ceiling          {clients:>3} clients: {ceiling}", flush=True)
    return report(args, results)


def report(args: argparse.Namespace, results: dict[str, dict]) -> int:
    columns = ["tokens_per_s", "p50_s", "p95_s", "p99_s", "ttft_p50_s", "ttft_p95_s"]
    columns += ["requests", "errors", "mean_batch", "cache_hit_rate"]
    print(f"\n{args.duration:.0f}s per run, {args.max_new_tokens} new tokens, concurrent clients")
    print(f"{'run':<22}" + "".join(f"{c:>15}" for c in columns))
    for name, row in results.items():
        print(f"{name:<22}" + "".join(f"{row.get(c, '')!s:>15}" for c in columns))
    for clients in args.clients:
        served, ceiling = results.get(f"openvino x{clients}"), results.get(f"ceiling x{clients}")
        if served and ceiling:
            share = served["tokens_per_s"] / max(ceiling["tokens_per_s"], 1e-9)
            results[f"openvino share of ceiling x{clients}"] = {"ratio": round(share, 3)}
            print(
                f"{clients:>3} clients: the service on OpenVINO reaches {share:.0%} of the engine"
            )
    out = benchmarks_dir() / f"serve_load-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
