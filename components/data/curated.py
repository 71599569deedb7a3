"""Curated examples: answers people reviewed (Label Studio) or corrected (`/feedback`).

Each sync that finds something new writes one more version file, `NNNN-<source>.jsonl`, into
the curated folder (`data.feedback_dir` of the profile, `$FLYWHEEL_HOME/curated` by default;
`FLYWHEEL_CURATED_DIR` overrides both). Files are never rewritten, so every training run's
data can be traced back to the versions it read. Before writing, each example is normalised,
PII-scrubbed, dropped if it repeats a request or an example already curated, and dropped if
its prompt overlaps the frozen test split, so feedback can never leak the test set into
training. The training pipeline ingests the folder and counts these examples as feedback.

What users teach passes the trust policy the memory uses (`components/memory/trust.py`):
a correction the memory would not serve is never curated. Each curated row records the rule
that admitted it, and `policy.json` in the folder the policy's latest judgement of every
correction sent (how many each rule admitted or refused).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from components.config import PipelineConfig
from components.data.ingest import curated_versions, load_frozen_test
from components.inference.records import Answer
from components.inference.store import InferenceStore
from components.memory.trust import Decision, Offer, TrustPolicy, tally
from components.paths import curated_dir
from components.records import Example, read_jsonl, write_jsonl
from components.text import Decontaminator, normalize_text, scrub_pii


class Asked(Protocol):
    """A logged question: an answer from the inference log, or a review of one."""

    @property
    def request_id(self) -> str: ...
    @property
    def prompt(self) -> str: ...
    @property
    def model_version(self) -> str: ...


@dataclass(frozen=True)
class CuratedItem:
    """One answer a person approved, or the answer they wrote instead."""

    request_id: str
    prompt: str
    answer: str
    source: str  # "label-studio", "feedback" or "rephrasing"
    verdict: str  # "approve", "correct", "correction" or "memory-hit"
    model_version: str = ""
    rule: str = ""  # the trust rule that admitted it: reviewed, agreement or memory_hit

    @classmethod
    def answering(
        cls, asked: Asked, answer: str, source: str, verdict: str, rule: str
    ) -> CuratedItem:
        """`answer` to the logged question `asked`, admitted by `rule`."""
        return cls(
            asked.request_id, asked.prompt, answer, source, verdict, asked.model_version, rule
        )


@dataclass(frozen=True)
class UserCorrections:
    """The `/feedback` corrections the trust policy admits for training, and how many of
    all those sent each rule admitted or refused."""

    items: list[CuratedItem]
    policy: dict[str, dict[str, int]]


@dataclass
class CurationResult:
    path: str | None
    written: int
    skipped: dict[str, int] = field(default_factory=dict)
    pii: dict[str, int] = field(default_factory=dict)


def held_out(request_id: str, fraction: float) -> bool:
    """Whether a live rephrasing is held out (never trained on): decided by the request, so
    the same request always lands on the same side, across every rebuild and retrain."""
    digest = int(hashlib.sha256(request_id.encode()).hexdigest()[:8], 16)
    return digest / 0xFFFFFFFF < fraction


def is_held_out_rephrasing(answer: Answer, fraction: float) -> bool:
    """A memory answer not rated down whose request falls on the held-out side."""
    return (
        bool(answer.memory_entry)
        and answer.rating != "down"
        and held_out(answer.request_id, fraction)
    )


def feedback_corrections(
    judged: Iterable[tuple[Answer, Decision]], holdout_fraction: float, since: float = 0.0
) -> list[CuratedItem]:
    """The admitted corrections rated since `since`: the answer users say was right (never
    one on a held-out live rephrasing, which only ever judges)."""
    return [
        CuratedItem.answering(a, a.correction or "", "feedback", "correction", decision.rule)
        for a, decision in judged
        if decision.admitted
        and (a.rated_at or 0.0) >= since
        and not is_held_out_rephrasing(a, holdout_fraction)
    ]


def write_curated(
    items: Iterable[CuratedItem],
    folder: Path,
    test: list[Example],
    decontam_ngram: int,
    policy: TrustPolicy,
) -> CurationResult:
    """Write the new, clean items the policy admits as the next version file; returns what
    was kept and why not."""
    curated = [r for p in curated_versions(folder) for r in read_jsonl(p)]
    seen_requests = {str(r.get("request_id")) for r in curated}
    seen_keys = {Example(instruction=r["instruction"], output=r["output"]).key() for r in curated}
    contaminated = Decontaminator(test, decontam_ngram)
    skipped: Counter[str] = Counter()
    pii: Counter[str] = Counter()
    rows = []
    for item in items:
        prompt = scrub_pii(normalize_text(item.prompt), pii)
        answer = scrub_pii(normalize_text(item.answer), pii)
        example = Example(instruction=prompt, output=answer)
        # What one offer must meet on its own (size, trust); feedback met the rest when judged
        checked = policy.check(Offer(prompt, answer, item.source, "", 0.0), sent_last_hour=0)
        if not checked.admitted:
            skipped[checked.rule] += 1
        elif item.request_id in seen_requests or example.key() in seen_keys:
            skipped["duplicate"] += 1
        elif contaminated(example):
            skipped["overlaps_test_split"] += 1
        else:
            seen_requests.add(item.request_id)
            seen_keys.add(example.key())
            rows.append(
                {
                    "instruction": prompt,
                    "output": answer,
                    "request_id": item.request_id,
                    "source": item.source,
                    "verdict": item.verdict,
                    "model_version": item.model_version,
                    "rule": item.rule or checked.rule,
                }
            )
    if not rows:
        return CurationResult(None, 0, dict(skipped), dict(pii))
    versions = curated_versions(folder)
    number = int(versions[-1].name[:4]) + 1 if versions else 1
    source = "-".join(sorted({r["source"] for r in rows}))
    path = folder / f"{number:04d}-{source}.jsonl"
    write_jsonl(path, rows)
    return CurationResult(str(path), len(rows), dict(skipped), dict(pii))


def summary(folder: Path) -> dict[str, int]:
    """Examples per version file, for reports."""
    return {p.name: len(read_jsonl(p)) for p in curated_versions(folder)}


def trust_summary(folder: Path) -> dict[str, dict[str, int]]:
    """The curated rows by the rule that admitted them (`unrecorded` in rows an older release
    wrote), and the corrections refused by rule at the latest curation (`policy.json`)."""
    admitted = Counter(
        str(row.get("rule") or "unrecorded")
        for path in curated_versions(folder)
        for row in read_jsonl(path)
    )
    judged = folder / POLICY_FILE
    refused = json.loads(judged.read_text()).get("refused", {}) if judged.exists() else {}
    return {"admitted": dict(sorted(admitted.items())), "refused": refused}


POLICY_FILE = "policy.json"


def curate(
    config: PipelineConfig,
    items: Iterable[CuratedItem],
    policy: dict[str, dict[str, int]] | None = None,
) -> CurationResult:
    """Write the items as the profile's next curated version (deduplicated, scrubbed, test-safe,
    admitted by the trust policy); `policy`, the judgement of every correction sent, is kept
    beside it as `policy.json`."""
    folder = curated_dir(config.data.feedback_dir)
    if policy is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / POLICY_FILE).write_text(json.dumps(policy, indent=2) + "\n")
    return write_curated(
        items,
        folder,
        load_frozen_test(config.data.test_path),
        config.clean.decontam_ngram,
        TrustPolicy(config.memory),
    )


def user_corrections(config: PipelineConfig, since: float) -> UserCorrections:
    """Corrections users sent with `/feedback` (rated since `since`) that the trust policy
    admits, as the memory does: none under `memory.trust: reviewed` (they reach training once
    reviewed in Label Studio); under `trust: feedback`, those sent by `min_agreement` clients
    within each client's rate and the size limit. Every correction ever sent is judged, since
    agreement and rates reach back before `since`."""
    with InferenceStore() as store:
        answers = store.answers_since(0.0, rated=True)
    judged = TrustPolicy(config.memory).judge_feedback(answers)
    items = feedback_corrections(judged, config.eval.live_holdout_fraction, since)
    return UserCorrections(items, tally([decision for _, decision in judged]))
