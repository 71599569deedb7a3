"""A model card per registered version: what it is, what it learned from, how it was judged.

Rendered from what the training run recorded (lineage, data counts, the recipe, both
evaluations and the gate), so a card never states what the run did not measure.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from components.config import PipelineConfig
from components.model.base_model import SMOLLM2, TINY_RANDOM, BaseModelRef
from components.paths import resolve_path

BASE_LICENSES = {
    SMOLLM2: "Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)",
    TINY_RANDOM: "Apache-2.0 (random weights with the SmolLM2 tokenizer)",
}
DATA_LICENSE = (
    "the seed data in `data/` is Flywheel's own (Apache-2.0); curated corrections come from "
    "this deployment's users and reviewers, under whatever terms they were collected"
)


@dataclass(frozen=True)
class CardFacts:
    """What a training run knows about the version it registered."""

    model_name: str
    version: str
    config: PipelineConfig
    base: BaseModelRef
    lineage: dict[str, str]
    data_counts: dict[str, int]  # ingested, quarantined, kept, train, validation, test, ...
    training: dict[str, Any]  # global_step, train_seconds, device, compute_dtype
    started_from: str  # "base", or "champion vN"
    frozen: Any  # EvalResult on the frozen split
    live: Any | None  # EvalResult on the live set, None when there was none
    gate: Any  # GateDecision


def _scores_table(result: Any) -> list[str]:
    metrics = list(next(iter(result.scores.values())))
    lines = [
        "| model | " + " | ".join(metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for model, by_metric in result.scores.items():
        cells = [f"{s['value']:.3f} [{s['low']:.3f}, {s['high']:.3f}]" for s in by_metric.values()]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines


def _sources(config: PipelineConfig) -> list[str]:
    lines = []
    for source in config.data.sources:
        path = resolve_path(source.path)
        if path.is_file():
            with path.open("rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()[:16]
        else:
            digest = "not a file"
        lines.append(f"| `{source.path}` | `{digest}` |")
    return lines


def _by_rule(counts: dict[str, int], side: str) -> str:
    """`admitted` or `refused` corrections per trust rule (`components/memory/trust.py`)."""
    rules = [f"{k.split('.', 1)[1]} {n}" for k, n in counts.items() if k.startswith(f"{side}.")]
    return ", ".join(rules) or "none"


def _anchor_line(anchor: Any, margin: float) -> list[str]:
    """How far the candidate is from the anchor (a Comparison, or None), the score no
    champion may fall below."""
    if anchor is None:
        return []
    return [
        f"Distance to the anchor (the first champion, or the profile's `eval.anchor_version`) "
        f"on the frozen split: {anchor.metric} {anchor.difference:+.4f} "
        f"[{anchor.low:+.4f}, {anchor.high:+.4f}]; the budget is the margin, {margin:g}, in all.",
        "",
    ]


def render_model_card(facts: CardFacts) -> str:
    """The card as Markdown."""
    c, lineage = facts.config, facts.lineage
    counts = facts.data_counts
    verdict = "promoted to champion" if facts.gate.promote else "not promoted"
    lines = [
        f"# {facts.model_name} version {facts.version}",
        "",
        f"{c.description} Profile `{c.name}`, MLflow run `{lineage.get('mlflow_run_id', '')}`,"
        f" code `{lineage.get('git_commit', 'unknown')}`.",
        "",
        "## Base model",
        "",
        f"- `{facts.base.name}` (revision {facts.base.revision or 'none'}), weights sha256 "
        f"`{facts.base.sha256}`",
        f"- license: {BASE_LICENSES.get(facts.base.name, 'see the base model’s own card')}",
        "",
        "## Data",
        "",
        "| source | sha256 (first 16) |",
        "|---|---|",
        *_sources(c),
        "",
        f"- training data hash `{lineage.get('dataset_hash', '')[:16]}`, frozen test split "
        f"hash `{lineage.get('test_hash', '')[:16]}`",
        f"- ingested {counts.get('ingested', 0)}, quarantined {counts.get('quarantined', 0)}, "
        f"kept after cleaning {counts.get('kept', 0)}; train {counts.get('train', 0)}, "
        f"validation {counts.get('validation', 0)}, frozen test {counts.get('test', 0)}",
        f"- curated feedback examples ingested: {lineage.get('from_feedback', '0')}; trained "
        f"on {counts.get('corrections_new', 0)} not learned before and "
        f"{counts.get('corrections_replayed', 0)} replayed of the "
        f"{counts.get('corrections_known', 0)} the weights it continues had learned",
        f"- curated examples by the trust rule that admitted them: {_by_rule(counts, 'admitted')}"
        f"; corrections refused at the latest curation: {_by_rule(counts, 'refused')}",
        f"- live set `{lineage.get('live_set_hash', 'none')[:16]}`: "
        f"{lineage.get('live_set_size', '0')} items",
        f"- data license: {DATA_LICENSE}",
        "",
        "## Training",
        "",
        f"- started from: {facts.started_from}; "
        f"{facts.training.get('global_step', 0)} steps in "
        f"{facts.training.get('train_seconds', 0):.0f} s on "
        f"{facts.training.get('device', '?')} ({facts.training.get('compute_dtype', '?')})",
        f"- LoRA: r={c.lora.r}, alpha={c.lora.alpha}, dropout={c.lora.dropout}, "
        f"targets {c.lora.target_modules}; 4-bit base: {c.quantization.load_in_4bit}",
        f"- optimiser: lr {c.train.learning_rate}, batch {c.train.batch_size} x "
        f"{c.train.gradient_accumulation_steps}, epochs {c.train.epochs}, max length "
        f"{c.train.max_seq_len}, seed {c.train.seed}",
        "- recipe: "
        + ", ".join(f"{name} {value}" for name, value in c.recipe.model_dump().items()),
        "",
        f"## Evaluation (without the correction memory; {c.eval.confidence:.0%} intervals)",
        "",
        f"Frozen test split, {facts.frozen.n_examples} prompts:",
        "",
        *_scores_table(facts.frozen),
    ]
    if facts.live is not None:
        lines += [
            "",
            f"Live set (what users corrected), {facts.live.n_examples} items:",
            "",
            *_scores_table(facts.live),
        ]
    lines += [
        "",
        "## Gate",
        "",
        f"**{verdict}**. The gate: {facts.gate.reason} (rule `{facts.gate.rule}`)",
        "",
        *_anchor_line(facts.frozen.anchor, c.eval.non_inferiority_margin),
        "## Known limits",
        "",
        f"- judged on {facts.frozen.n_examples} frozen prompts"
        + (f" and {facts.live.n_examples} live items" if facts.live is not None else "")
        + "; ROUGE-L and BLEU measure overlap with a reference answer, not correctness",
        "- a small model states facts it was not trained on unreliably, and rephrasings of "
        "corrected questions less reliably than the questions themselves",
        "- answers served from the correction memory are not this model's; this card "
        "describes the weights alone",
    ]
    return "\n".join(lines) + "\n"
