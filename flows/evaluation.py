"""Evaluate stage: candidate vs base vs champion on the frozen test split, and candidate vs
champion on the live set (what users corrected), both without the correction memory."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, task

from components.config import PipelineConfig
from components.evaluate.evaluation import EvalResult, ModelSpec, evaluate_models
from components.model.base_model import BaseModelRef
from components.records import load_examples, read_jsonl
from components.registry.aliases import ANCHOR, current_champion, version_at
from components.registry.register import download_version
from components.registry.tracking import RunLogger
from flows.reports import publish_eval_report


@dataclass(frozen=True)
class Reference:
    """A registered version the candidate is held against."""

    version: str
    spec: ModelSpec


@task(retries=3, retry_delay_seconds=[2, 5, 15])
def fetch_version(model_name: str, version: str | None, dest: Path) -> Reference | None:
    if version is None:
        return None
    base_path, adapter_dir = download_version(model_name, version, dest / version)
    return Reference(version, ModelSpec(base_path, adapter_dir))


def anchor_version(config: PipelineConfig) -> str | None:
    """The version no champion may fall below: the profile's pin, else the first champion."""
    if config.eval.anchor_version is not None:
        return str(config.eval.anchor_version)
    anchor = version_at(config.registry.model_name, ANCHOR)
    return str(anchor.version) if anchor is not None else None


@dataclass
class Evaluation:
    frozen: EvalResult
    live: EvalResult | None  # None: no live set, or no champion to hold it against


@task
def score_models(
    models: dict[str, ModelSpec],
    test_path: str,
    config: PipelineConfig,
    out_dir: Path,
    anchor: str | None,
) -> EvalResult:
    examples = load_examples(Path(test_path))
    return evaluate_models(models, examples, config.eval, out_dir, anchor=anchor)


@task
def score_live(
    models: dict[str, ModelSpec], live_path: str, config: PipelineConfig, out_dir: Path
) -> EvalResult:
    """Every live item, judged on the live metric (the corrections are few and all count)."""
    settings = config.eval.model_copy(
        update={"gate_metric": config.eval.live_metric, "max_examples": None}
    )
    return evaluate_models(models, load_examples(Path(live_path)), settings, out_dir)


@flow(name="evaluate")
def evaluate_stage(
    config: PipelineConfig,
    base: BaseModelRef,
    adapter_dir: str,
    test_path: str,
    out_dir: str,
    run_id: str,
    live_path: str | None = None,
) -> Evaluation:
    """Score base, candidate and (if any) champion and anchor on the frozen split, candidate
    and champion on the live set; log metrics, plots and sample tables."""
    models = {"base": ModelSpec(base.path), "candidate": ModelSpec(base.path, adapter_dir)}
    live = None
    name = config.registry.model_name
    with tempfile.TemporaryDirectory() as tmp:
        current = current_champion(name)
        champion = fetch_version(name, str(current.version) if current else None, Path(tmp))
        anchor, anchor_name = anchor_version(config), None
        if champion is not None:
            models["champion"] = champion.spec
            anchor_name = "champion" if anchor == champion.version else None
        anchored = fetch_version(name, anchor, Path(tmp)) if anchor_name is None else None
        if anchored is not None:
            models["anchor"], anchor_name = anchored.spec, "anchor"
        result = score_models(models, test_path, config, Path(out_dir), anchor_name)
        if champion is not None and live_path:
            pair = {"candidate": models["candidate"], "champion": champion.spec}
            live = score_live(pair, live_path, config, Path(out_dir) / "live")

    run = RunLogger(run_id)
    run.metrics(
        {
            f"eval.{model}.{metric}{suffix}": s[key]
            for model, metrics in result.scores.items()
            for metric, s in metrics.items()
            for key, suffix in (("value", ""), ("low", ".ci_low"), ("high", ".ci_high"))
        }
    )
    run.json(result.to_dict(), "eval/result.json")
    run.artifact(result.plot_path, "eval")
    run.table(read_jsonl(Path(result.samples_path)), "eval/samples.json")
    if live is not None:
        run.metrics(
            {
                f"eval.live.{model}.{metric}": s["value"]
                for model, metrics in live.scores.items()
                for metric, s in metrics.items()
            }
        )
        run.json(live.to_dict(), "eval/live/result.json")
        run.artifact(live.plot_path, "eval/live")
    publish_eval_report(config.name, result)
    return Evaluation(result, live)
