"""Fine-tune stage: LoRA/QLoRA with checkpoints; a rerun with the same inputs resumes."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from components.config import PipelineConfig
from components.model.base_model import BaseModelRef
from components.registry.tracking import RunLogger
from components.train.finetune import FinetuneResult, finetune


@task(retries=1)  # a retry resumes from the last checkpoint instead of starting over
def train_adapter(
    config: PipelineConfig,
    base: BaseModelRef,
    train_path: str,
    validation_path: str,
    output_dir: Path,
    run_id: str,
) -> FinetuneResult:
    run = RunLogger(run_id)
    return finetune(
        config,
        base,
        train_path,
        validation_path,
        output_dir,
        on_log=lambda metrics, step: run.metrics(
            {f"train.{k}": v for k, v in metrics.items()}, step
        ),
    )


@flow(name="finetune")
def finetune_stage(
    config: PipelineConfig,
    base: BaseModelRef,
    train_path: str,
    validation_path: str,
    output_dir: str,
    run_id: str,
) -> FinetuneResult:
    """Train the adapter and log the loss curve and training figures."""
    result = train_adapter(config, base, train_path, validation_path, Path(output_dir), run_id)
    run = RunLogger(run_id)
    run.artifact(result.loss_curve_png, "finetune")
    run.metrics(
        {
            "finetune.global_step": result.global_step,
            "finetune.train_seconds": result.train_seconds,
            "finetune.train_tokens": result.train_tokens,
            "finetune.trainable_parameters": result.trainable_parameters,
        }
    )
    run.tags(
        {
            "finetune.resumed_from": result.resumed_from or "none",
            "finetune.device": result.device,
            "finetune.compute_dtype": result.compute_dtype,
        }
    )
    return result
