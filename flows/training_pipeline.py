"""The training pipeline: data -> fine-tune -> evaluate -> register, as one Prefect flow.

Run it directly (a temporary Prefect server starts if none is configured):

    python -m flows.training_pipeline --profile deployments/profiles/tiny.yaml

or as the deployment `training-pipeline/<profile>` (see prefect.yaml).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, task

from components.config import PipelineConfig, SourceConfig, load_profile, profile_path
from components.data.split import Continuing
from components.model.base_model import BaseModelRef, resolve_base_model
from components.monitor.pushed import report_retrain
from components.paths import runs_dir, tracking_uri
from components.registry.aliases import CANARY, CHAMPION
from components.registry.model_card import CardFacts
from components.registry.register import LiveEvidence
from components.registry.tracking import RunLogger, git_commit
from flows.data_prep import data_prep
from flows.deploy import deploy
from flows.evaluation import evaluate_stage
from flows.finetuning import Start, finetune_stage, started_from, starting_adapter
from flows.registration import record_model_card, register_stage


@dataclass
class PipelineSummary:
    profile: str
    mlflow_run_id: str
    model_name: str
    version: str
    promoted: bool
    promoted_to: str | None  # champion, or canary (serve.canary)
    reason: str
    gate_rule: str  # "two-sided", or "frozen" for a first model or a small live set
    scores: dict[str, dict[str, dict[str, float]]]
    run_dir: str
    deployed_url: str | None
    seconds: float


@task(retries=2, retry_delay_seconds=[5, 30])
def resolve_base(config: PipelineConfig) -> BaseModelRef:
    return resolve_base_model(config.model)


def with_extra_sources(config: PipelineConfig, extra_sources: list[str]) -> PipelineConfig:
    """The profile's config with more sources appended (e.g. a feedback export)."""
    if not extra_sources:
        return config
    sources = [*config.data.sources, *(SourceConfig(path=p) for p in extra_sources)]
    return config.model_copy(update={"data": config.data.model_copy(update={"sources": sources})})


def finetune_dir(config: PipelineConfig, data_hash: str, start: Start | None = None) -> Path:
    """Same training inputs -> same folder, so a killed run resumes where it stopped.

    Keyed by what changes the trained weights (base model, LoRA, quantization, training
    settings and recipe, the training data and the adapter it continues), not by serve,
    monitor or eval settings."""
    training = [config.model, config.lora, config.quantization, config.train]
    text = "".join(part.model_dump_json() for part in training) + data_hash
    text += config.recipe.model_dump_json(exclude={"start"})  # the start is keyed below
    if start is not None:
        text += f"{config.registry.model_name}/{start.version}"
    key = hashlib.sha256(text.encode()).hexdigest()[:12]
    return runs_dir(config.name) / f"finetune-{key}"


def _report_outcome(succeeded: bool):  # -> a Prefect state hook
    def hook(flow: Any, flow_run: Any, state: Any) -> None:
        report_retrain(load_profile(flow_run.parameters.get("profile", "tiny")), succeeded)

    return hook


@flow(
    name="training-pipeline",
    log_prints=True,
    on_completion=[_report_outcome(True)],
    on_failure=[_report_outcome(False)],
    on_crashed=[_report_outcome(False)],
)
def training_pipeline(
    profile: str = "tiny",
    extra_sources: list[str] | None = None,
    deploy_if_promoted: bool | None = None,
) -> dict:
    """Ingest and clean data, fine-tune, evaluate against base and champion, register.

    A promoted version is deployed when `deploy_if_promoted` is true, or when it is left
    unset and the profile's `serve.deploy_on_promotion` is (the monitor's retrains set it).
    """
    started = time.perf_counter()
    config = with_extra_sources(load_profile(profile), extra_sources or [])
    base = resolve_base(config)
    lineage = {
        "profile": config.name,
        "base_model": base.name,
        "base_model_revision": base.revision or "none",
        "base_model_sha256": base.sha256,
        "git_commit": git_commit(),
    }
    run = RunLogger.start(
        config.registry.experiment,
        run_name=f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}",
        tags=lineage,
    )
    try:
        run.params(config.model_dump())
        run.artifact(profile_path(profile), "profile")
        run_dir = runs_dir(config.name) / run.run_id
        start = starting_adapter(config, base, run_dir / "start")
        continuing = (
            Continuing(start.version, start.learned, config.recipe.replay) if start else None
        )
        data = data_prep(config, base, str(run_dir / "data"), run.run_id, continuing)
        lineage |= {
            "dataset_hash": data.split.train_hash,
            "test_hash": data.split.test_hash,
            "from_feedback": str(data.ingest.from_feedback),
            "live_set_hash": data.live.content_hash or "none",
            "live_set_size": str(data.live.size),
            "mlflow_run_id": run.run_id,
        }
        run.tags(lineage)
        trained = finetune_stage(
            config,
            base,
            data.split.train_path,
            data.split.validation_path,
            str(finetune_dir(config, data.split.train_hash, start)),
            run.run_id,
            start,
            data.stop_path,
        )
        evaluated = evaluate_stage(
            config,
            base,
            trained.adapter_dir,
            data.split.test_path,
            str(run_dir / "eval"),
            run.run_id,
            data.live.path,
        )
        live = None
        if evaluated.live is not None:
            live = LiveEvidence(
                evaluated.live.comparison,
                size=data.live.size,
                min_size=config.eval.live_min_size,
                margin=config.eval.non_inferiority_margin,
            )
        registered = register_stage(
            config.registry.model_name,
            trained.adapter_dir,
            base,
            lineage,
            evaluated.frozen,
            run.run_id,
            live,
            CANARY if config.serve.canary.enabled else CHAMPION,
        )
        record_model_card(
            CardFacts(
                registered.model_name,
                registered.version,
                config,
                base,
                lineage,
                data.counts(),
                trained.to_dict(),
                started_from(start),
                evaluated.frozen,
                evaluated.live,
                registered.gate,
            ),
            run.run_id,
            run_dir,
        )
        if deploy_if_promoted is None:
            deploy_if_promoted = config.serve.deploy_on_promotion
        deployed_url = None
        if registered.gate.promote and deploy_if_promoted:
            deployed = deploy(
                registered.model_name,
                registered.version,
                config,
                registered.previous_champion,
                canary=config.serve.canary.enabled,
            )
            deployed_url = deployed["url"]
            run.tags({"deployed_at": deployed_url})
    except BaseException:
        run.finish("FAILED")
        raise
    run.finish()
    summary = PipelineSummary(
        profile=config.name,
        mlflow_run_id=run.run_id,
        model_name=registered.model_name,
        version=registered.version,
        promoted=registered.gate.promote,
        promoted_to=registered.aliases[-1] if registered.gate.promote else None,
        reason=registered.gate.reason,
        gate_rule=registered.gate.rule,
        scores=evaluated.frozen.scores,
        run_dir=str(run_dir),
        deployed_url=deployed_url,
        seconds=round(time.perf_counter() - started, 1),
    )
    print(format_summary(summary))
    return summary.__dict__


def format_summary(summary: PipelineSummary) -> str:
    """What happened and where to look, for the terminal."""
    lines = [
        f"\n{summary.model_name} version {summary.version} "
        f"({f'promoted to {summary.promoted_to}' if summary.promoted else 'challenger only'}) "
        f"in {summary.seconds:.0f}s",
        f"  gate: {summary.reason}",
        "  frozen test split (value [95% CI]):",
    ]
    for model, metrics in summary.scores.items():
        cells = ", ".join(
            f"{m} {s['value']:.3f} [{s['low']:.3f}, {s['high']:.3f}]" for m, s in metrics.items()
        )
        lines.append(f"    {model:<9} {cells}")
    lines += [
        f"  MLflow run {summary.mlflow_run_id} in {tracking_uri()}",
        f"  files: {summary.run_dir}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.training_pipeline", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--profile",
        default="tiny",
        help="profile name (tiny, cpu-small, gpu-qlora, gpu-fsdp) or path to a YAML file",
    )
    parser.add_argument(
        "--extra-source",
        action="append",
        default=[],
        metavar="PATH",
        help="another data source to ingest (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    result: Any = training_pipeline(profile=args.profile, extra_sources=args.extra_source)
    if args.json:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
