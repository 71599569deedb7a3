"""Evaluate stage: candidate vs base vs champion on the frozen test split."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import flow, task

from components.config import PipelineConfig
from components.evaluate.evaluation import EvalResult, ModelSpec, evaluate_models
from components.model.base_model import BaseModelRef
from components.records import load_examples, read_jsonl
from components.registry.register import current_champion, download_version
from components.registry.tracking import RunLogger
from flows.reports import publish_eval_report


@task(retries=3, retry_delay_seconds=[2, 5, 15])
def fetch_champion(model_name: str, dest: Path) -> ModelSpec | None:
    champion = current_champion(model_name)
    if champion is None:
        return None
    base_path, adapter_dir = download_version(model_name, champion.version, dest)
    return ModelSpec(base_path, adapter_dir)


@task
def score_models(
    models: dict[str, ModelSpec], test_path: str, config: PipelineConfig, out_dir: Path
) -> EvalResult:
    return evaluate_models(models, load_examples(Path(test_path)), config.eval, out_dir)


@flow(name="evaluate")
def evaluate_stage(
    config: PipelineConfig,
    base: BaseModelRef,
    adapter_dir: str,
    test_path: str,
    out_dir: str,
    run_id: str,
) -> EvalResult:
    """Score base, candidate and (if any) champion; log metrics, plot and sample table."""
    models = {"base": ModelSpec(base.path), "candidate": ModelSpec(base.path, adapter_dir)}
    with tempfile.TemporaryDirectory() as tmp:
        champion = fetch_champion(config.registry.model_name, Path(tmp))
        if champion is not None:
            models["champion"] = champion
        result = score_models(models, test_path, config, Path(out_dir))

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
    publish_eval_report(config.name, result)
    return result
