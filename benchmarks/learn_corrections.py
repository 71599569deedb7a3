"""What a retrain learns from corrections: facts the weights alone state afterwards.

Writes a JSONL of `{q, p, a, key}` facts (question, a rephrasing never trained on, the
correction, a string the correction states) as curated feedback into a fresh home, runs the
training pipeline of the profile with its recipe, and asks the base model and the trained
model every question and every rephrasing (greedy, 40 new tokens, no memory): a fact is
stated when its key is in the answer. The frozen-split comparison comes from the same run.

    .venv/bin/python -m benchmarks.learn_corrections --facts path/to/facts.jsonl --profile cpu-small

Figures are printed and written as JSON into the run's home under `$FLYWHEEL_HOME/benchmarks/`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.homes import use_fresh_home
from components.model.generation import generate_chat, load_for_inference
from components.records import read_jsonl, write_jsonl
from components.registry.register import download_version


def stated(model: object, tokenizer: object, facts: list[dict], field: str) -> list[bool]:

    conversations = [[{"role": "user", "content": f[field]}] for f in facts]
    answers = generate_chat(model, tokenizer, conversations, max_new_tokens=40)
    return [f["key"].lower() in a.text.lower() for f, a in zip(facts, answers, strict=True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.learn_corrections", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--facts", type=Path, required=True, help="JSONL of {q, p, a, key}")
    parser.add_argument("--profile", default="cpu-small")
    args = parser.parse_args(argv)

    facts = read_jsonl(args.facts)
    home = use_fresh_home("learn")  # a fresh registry, store and curated folder
    rows = [
        {"instruction": f["q"], "output": f["a"], "request_id": f"fact-{i}", "source": "feedback"}
        for i, f in enumerate(facts)
    ]
    write_jsonl(home / "curated" / "0001-feedback.jsonl", rows)

    # Imported once the fresh home is set: Prefect reads its settings when it is imported.
    from flows.training_pipeline import training_pipeline

    started = time.perf_counter()
    summary = training_pipeline(profile=args.profile)
    train_seconds = time.perf_counter() - started
    base_path, adapter = download_version(summary["model_name"], summary["version"], home / "dl")
    figures: dict[str, object] = {"facts": len(facts), "pipeline_seconds": round(train_seconds)}
    for name, adapter_dir in (("base", None), ("trained", adapter)):
        model, tokenizer = load_for_inference(base_path, adapter_dir)
        figures[name] = {
            "same_question": sum(stated(model, tokenizer, facts, "q")),
            "rephrased": sum(stated(model, tokenizer, facts, "p")),
        }
    rouge = {model: metrics["rouge_l"] for model, metrics in summary["scores"].items()}
    figures["frozen_rouge_l"] = rouge
    figures["gate"] = summary["reason"]
    n = len(facts)
    trained, base = figures["trained"], figures["base"]
    print(
        f"{n} facts, profile {args.profile}, pipeline {train_seconds / 60:.1f} min: the trained "
        f"model alone states {trained['same_question']}/{n} on the same question and "
        f"{trained['rephrased']}/{n} rephrased (base: {base['same_question']}/{n}, "
        f"{base['rephrased']}/{n})"
    )
    for model, s in rouge.items():
        print(f"  frozen ROUGE-L {model}: {s['value']:.3f} [{s['low']:.3f}, {s['high']:.3f}]")
    print(f"  gate: {summary['reason']}")
    out = home / "learn_corrections.json"
    out.write_text(json.dumps({"args": vars(args), "results": figures}, indent=1, default=str))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
