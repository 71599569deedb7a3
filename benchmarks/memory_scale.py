"""The correction memory at scale: facts in families that differ in one word.

Reads a folder of facts in families (`facts.jsonl`: `q` a question, `p` a rephrasing, `a` its
correction, `key` the value the correction states, `group` its family; `untaught.jsonl`: near
misses `q` of a `kind` near a taught `group`; `general.jsonl`: unrelated prompts `q`). For each
size N it starts the profile's champion with a memory of its own (`memory.trust=feedback`),
teaches the first N facts (whole families, in file order) through the public API (ask `q`,
send `a` with `POST /feedback`), then asks every question again:

- reliability: `q` answered with the fact's own key; generalization: the same for `p`;
- wrong-fact answers: an answer holding another taught fact's key (`q`, `p`, near misses, and
  `q` asked *before* its fact was taught, where any memory hit is a sibling's correction);
- locality: near misses (per kind) and unrelated prompts the memory left to the model
  (`x-flywheel-memory: miss`);
- latency of the memory's answers, as the client sees it (p50, p95).

A key counts when it occurs case-insensitively as a whole word.

With `--retrain N`, after the memory's figures at size N the corrections it was taught are
curated as the monitor curates them (from that service's feedback log) into a fresh home and
the profile's training pipeline runs once; the trained version's weights alone (greedy, no
memory) are then asked the same questions: right and wrong-fact answers on `q`, on `p` (and on
the rephrasings it never trained on: the live set's trainable ones are curated too), near
misses and unrelated prompts answered with a fact's value, and the pipeline's wall time.

    .venv/bin/python -m benchmarks.memory_scale --facts-dir DIR --sizes 24,96,240 --retrain 24

Figures are printed as a table and written as JSON under `$FLYWHEEL_HOME/benchmarks/`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path
from statistics import quantiles

import httpx

from benchmarks.homes import use_fresh_home
from benchmarks.memory_recall import memory_service
from components.config import OVERRIDES_ENV, load_profile
from components.paths import benchmarks_dir
from components.records import read_jsonl

MODEL_TOKENS = 24  # enough for a model's answer to state a value; the memory's is whole
# The benchmark measures recall, not the per-client rate limit: one client teaches everything.
OVERRIDES = "memory.corrections_per_client_per_hour=100000"


def states(text: str, key: str) -> bool:
    """`key` occurs in `text` as a whole word or number, whatever the case."""
    pattern = rf"(?<![\w])(?<!\d[.,:]){re.escape(key.lower())}(?![\w])(?![.,:]\d)"
    return re.search(pattern, text.lower()) is not None


def families(facts: list[dict], n: int) -> list[dict]:
    """The first `n` facts, rounded down to whole families, in the order they come."""
    groups: dict[str, list[dict]] = {}
    for fact in facts:
        groups.setdefault(fact["group"], []).append(fact)
    chosen: list[dict] = []
    for members in groups.values():
        if len(chosen) + len(members) > n:
            break
        chosen += members
    return chosen


class Asker:
    """Asks the service; keeps what the memory did and how long its answers took."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = httpx.Client(timeout=300)
        self.hit_ms: list[float] = []

    def ask(self, prompt: str, max_new_tokens: int = MODEL_TOKENS) -> tuple[str, dict]:
        started = time.perf_counter()
        response = self.client.post(
            f"{self.url}/generate", json={"prompt": prompt, "max_new_tokens": max_new_tokens}
        )
        response.raise_for_status()
        status = response.headers["x-flywheel-memory"]
        if status == "hit":
            self.hit_ms.append((time.perf_counter() - started) * 1000)
        return status, response.json()

    def correct(self, request_id: str, correction: str) -> str:
        body = {"request_id": request_id, "rating": "down", "correction": correction}
        response = self.client.post(f"{self.url}/feedback", json=body)
        response.raise_for_status()
        return str(response.json().get("memory", ""))


def judge(answer: str, own: str | None, keys: list[str]) -> str:
    """right (the own key), wrong (another fact's key) or neither."""
    if own is not None and states(answer, own):
        return "right"
    return "wrong" if any(states(answer, k) for k in keys if k != own) else "neither"


def measure(url: str, facts: list[dict], untaught: list[dict], general: list[dict]) -> dict:
    asker = Asker(url)
    keys = [f["key"] for f in facts]
    before, not_kept = Counter(), []
    for fact in facts:  # teach, noting what the memory says before the fact is taught
        status, first = asker.ask(fact["q"], 8)
        if status == "hit":
            before[judge(first["text"], None, keys)] += 1
        kept = asker.correct(first["request_id"], fact["a"])
        if not kept.startswith("kept"):
            not_kept.append({"q": fact["q"], "memory": kept})
    asker.hit_ms.clear()  # latency is measured on taught questions only
    taught: dict[str, Counter] = {"q": Counter(), "p": Counter()}
    examples: list[dict] = []
    for fact in facts:
        for field in ("q", "p"):
            status, answer = asker.ask(fact[field])
            verdict = judge(answer["text"], fact["key"], keys)
            taught[field][verdict] += 1
            taught[field][status] += 1
            if verdict != "right":
                examples.append({"asked": fact[field], "memory": status, "verdict": verdict})
    near: dict[str, Counter] = {}
    for item in untaught:
        status, answer = asker.ask(item["q"])
        counts = near.setdefault(item["kind"], Counter())
        counts["asked"] += 1
        counts[status] += 1
        counts[judge(answer["text"], None, keys)] += 1
        if status == "hit":
            examples.append({"asked": item["q"], "memory": status, "kind": item["kind"]})
    unrelated = Counter(asker.ask(g["q"], 1)[0] for g in general)
    cuts = quantiles(asker.hit_ms, n=20) if len(asker.hit_ms) >= 2 else [float("nan")] * 19
    n = len(facts)
    return {
        "facts": n,
        "families": len({f["group"] for f in facts}),
        "same_question": {"right": taught["q"]["right"], "wrong": taught["q"]["wrong"]},
        "rephrased": {"right": taught["p"]["right"], "wrong": taught["p"]["wrong"]},
        "before_taught": {"asked": n, "hits": sum(before.values()), "wrong": before["wrong"]},
        "near_misses": {
            kind: {"asked": c["asked"], "left_to_model": c["miss"], "wrong": c["wrong"]}
            for kind, c in sorted(near.items())
        },
        "unrelated": {"asked": len(general), "left_to_model": unrelated["miss"]},
        "hit_latency_ms": {"p50": round(cuts[9], 1), "p95": round(cuts[18], 1)},
        "corrections_not_kept": not_kept,
        "examples": examples[:60],
    }


def weights_alone(
    profile: str, feedback_db: Path, facts: list[dict], untaught: list[dict], general: list[dict]
) -> dict:
    """One retrain on the corrections in `feedback_db`, in a fresh home; what its weights
    alone answer."""
    home = use_fresh_home(
        "memory-scale-retrain",
        **{
            OVERRIDES_ENV: "memory.trust=feedback",
            "FLYWHEEL_FEEDBACK_DB": f"sqlite:///{feedback_db}",
        },
    )
    os.environ["PREFECT_HOME"] = str(home / "prefect")  # a Prefect server of its own
    # Imported once the fresh home is set: Prefect reads its settings when it is imported.
    from components.data.curated import curate, user_corrections
    from components.data.ingest import curated_versions
    from components.model.generation import generate_chat, load_for_inference
    from components.paths import curated_dir
    from components.registry.register import download_version
    from flows.training_pipeline import training_pipeline

    config = load_profile(profile)
    corrections = user_corrections(config, 0.0)
    curated = curate(config, corrections.items, corrections.policy)
    started = time.perf_counter()
    summary = training_pipeline(profile=profile)
    seconds = round(time.perf_counter() - started)
    folder = curated_dir(config.data.feedback_dir)
    trained = {r["instruction"] for p in curated_versions(folder) for r in read_jsonl(p)}
    base_path, adapter = download_version(summary["model_name"], summary["version"], home / "dl")
    model, tokenizer = load_for_inference(base_path, adapter)

    def answers(prompts: list[str]) -> list[str]:
        asked = [[{"role": "user", "content": p}] for p in prompts]
        return [g.text for g in generate_chat(model, tokenizer, asked, MODEL_TOKENS)]

    keys = [f["key"] for f in facts]
    verdicts = {}
    for field in ("q", "p"):
        said = answers([f[field] for f in facts])
        verdicts[field] = [judge(a, f["key"], keys) for f, a in zip(facts, said, strict=True)]
    unseen = [v for f, v in zip(facts, verdicts["p"], strict=True) if f["p"] not in trained]
    near = [judge(a, None, keys) for a in answers([u["q"] for u in untaught])]
    unrelated = [judge(a, None, keys) for a in answers([g["q"] for g in general])]
    return {
        "curated": curated.written,
        "version": summary["version"],
        "promoted": summary["promoted"],
        "gate": summary["reason"],
        "pipeline_seconds": seconds,
        "same_question": {
            "right": verdicts["q"].count("right"),
            "wrong": verdicts["q"].count("wrong"),
        },
        "rephrased": {"right": verdicts["p"].count("right"), "wrong": verdicts["p"].count("wrong")},
        "rephrased_never_trained": {"asked": len(unseen), "right": unseen.count("right")},
        "near_misses": {"asked": len(near), "wrong": near.count("wrong")},
        "unrelated": {"asked": len(unrelated), "wrong": unrelated.count("wrong")},
        "frozen_rouge_l": {m: s["rouge_l"] for m, s in summary["scores"].items()},
    }


def table(results: list[dict]) -> str:
    """The figures as a Markdown table, one column per size."""

    def share(part: int, whole: int) -> str:
        return f"{part}/{whole} ({100 * part / whole:.0f}%)" if whole else "-"

    rows: list[tuple[str, list[str]]] = []

    def row(name: str, cell: object) -> None:
        rows.append((name, [cell(r) for r in results]))  # type: ignore[operator]

    row("facts (families)", lambda r: f"{r['facts']} ({r['families']})")
    row("same question: right", lambda r: share(r["same_question"]["right"], r["facts"]))
    row("rephrased: right", lambda r: share(r["rephrased"]["right"], r["facts"]))
    row(
        "wrong-fact answers (same, rephrased)",
        lambda r: f"{r['same_question']['wrong']}, {r['rephrased']['wrong']}",
    )
    kinds = sorted({k for r in results for k in r["near_misses"]})
    for kind in kinds:
        row(
            f"near misses left to the model: {kind}",
            lambda r, k=kind: share(
                r["near_misses"].get(k, {}).get("left_to_model", 0),
                r["near_misses"].get(k, {}).get("asked", 0),
            ),
        )
    row(
        "near misses answered with a fact's value",
        lambda r: str(sum(c["wrong"] for c in r["near_misses"].values())),
    )
    row(
        "unrelated prompts left to the model",
        lambda r: share(r["unrelated"]["left_to_model"], r["unrelated"]["asked"]),
    )
    row(
        "untaught siblings answered while teaching",
        lambda r: share(r["before_taught"]["hits"], r["before_taught"]["asked"]),
    )
    row(
        "memory hit latency p50 / p95 (ms)", lambda r: "{p50} / {p95}".format(**r["hit_latency_ms"])
    )
    lines = ["| N = | " + " | ".join(str(r["facts"]) for r in results) + " |"]
    lines.append("|---|" + "---:|" * len(results))
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.memory_scale", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--facts-dir", type=Path, required=True, help="facts, untaught, general")
    parser.add_argument("--profile", default="cpu-small")
    parser.add_argument("--sizes", default="24,96,240", help="facts taught, comma-separated")
    parser.add_argument("--port", type=int, default=3303)
    parser.add_argument(
        "--model-uri", help="the model that answers what the memory does not (default: champion)"
    )
    parser.add_argument(
        "--retrain", type=int, metavar="N", help="after size N, one retrain on its corrections"
    )
    args = parser.parse_args(argv)

    facts = read_jsonl(args.facts_dir / "facts.jsonl")
    untaught = read_jsonl(args.facts_dir / "untaught.jsonl")
    general = read_jsonl(args.facts_dir / "general.jsonl")
    run = benchmarks_dir() / f"memory-scale-{time.strftime('%Y%m%d-%H%M%S')}"
    results = []
    for size in [int(s) for s in args.sizes.split(",")]:
        chosen = families(facts, size)
        groups = {f["group"] for f in chosen}
        near = [u for u in untaught if u["group"] in groups]
        started = time.perf_counter()
        with memory_service(
            args.profile, args.port, run / str(size), OVERRIDES, args.model_uri
        ) as url:
            figures = measure(url, chosen, near, general)
        figures["seconds"] = round(time.perf_counter() - started)
        results.append(figures)
        print(f"N={figures['facts']}: {figures['seconds']} s", flush=True)
        if size == args.retrain:
            retrained = weights_alone(
                args.profile, run / str(size) / "feedback.db", chosen, near, general
            )
            figures["weights_alone"] = retrained
            print(f"retrain at N={figures['facts']}: {json.dumps(retrained)}", flush=True)
    print(table(results))
    run.mkdir(parents=True, exist_ok=True)
    out = run / "memory_scale.json"
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=1, default=str))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
