"""Fine-tune stage: LoRA/QLoRA with checkpoints; a rerun with the same inputs resumes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task

from components.config import PipelineConfig
from components.model.base_model import BaseModelRef
from components.registry.aliases import current_champion
from components.registry.register import download_version, learned_corrections
from components.registry.tracking import RunLogger
from components.train.finetune import FinetuneResult, continuable, finetune
from components.train.launch import launched_finetune


@dataclass(frozen=True)
class Start:
    """The adapter a retrain continues: the champion's, fetched from the registry, and the
    corrections its run recorded as learned (empty for a run that recorded none: every
    correction is then trained on as new)."""

    version: str
    adapter_dir: str
    learned: frozenset[str] = frozenset()


def started_from(start: Start | None) -> str:
    """Where training started, as the run records it: `base` or `champion vN`."""
    return f"champion v{start.version}" if start else "base"


@task(retries=3, retry_delay_seconds=[2, 5, 15])
def starting_adapter(config: PipelineConfig, base: BaseModelRef, dest: Path) -> Start | None:
    """The champion's adapter under `recipe.start: champion`, when it was trained on the same
    base weights and has the profile's LoRA shape; None (train from the base) otherwise."""
    if config.recipe.start != "champion":
        return None
    champion = current_champion(config.registry.model_name)
    if champion is None:
        return None
    try:
        base_path, adapter_dir = download_version(
            config.registry.model_name, str(champion.version), dest
        )
    except RuntimeError as exc:  # the champion's base weights are no longer the ones it had
        get_run_logger().warning("training from the base: %s", exc)
        return None
    if Path(base_path).resolve() != Path(base.path).resolve():
        get_run_logger().warning(
            "training from the base: champion v%s was trained on another base model",
            champion.version,
        )
        return None
    if not continuable(adapter_dir, config.lora):
        get_run_logger().warning(
            "training from the base: champion v%s has another LoRA rank or alpha",
            champion.version,
        )
        return None
    learned = learned_corrections(champion.run_id, dest / "learned")
    if learned is None:
        get_run_logger().warning(
            "champion v%s recorded no learned corrections: training on every one as new",
            champion.version,
        )
    return Start(str(champion.version), adapter_dir, learned or frozenset())


@task(retries=1)  # a retry resumes from the last checkpoint instead of starting over
def train_adapter(
    config: PipelineConfig,
    base: BaseModelRef,
    train_path: str,
    validation_path: str,
    output_dir: Path,
    run_id: str,
    init_adapter: str | None,
    stop_path: str | None,
) -> FinetuneResult:
    if config.train.accelerate_config:  # in the processes `accelerate launch` starts
        return launched_finetune(
            config, base, train_path, validation_path, output_dir, run_id, init_adapter, stop_path
        )
    return finetune(
        config,
        base,
        train_path,
        validation_path,
        output_dir,
        on_log=RunLogger(run_id).training_log,
        init_adapter=init_adapter,
        stop_path=stop_path,
    )


@flow(name="finetune")
def finetune_stage(
    config: PipelineConfig,
    base: BaseModelRef,
    train_path: str,
    validation_path: str,
    output_dir: str,
    run_id: str,
    start: Start | None = None,
    stop_path: str | None = None,
) -> FinetuneResult:
    """Train the adapter (fresh, or continuing `start`; early-stopping on `stop_path` where the
    recipe says so) and log the loss curve and figures."""
    init_adapter = start.adapter_dir if start else None
    result = train_adapter(
        config, base, train_path, validation_path, Path(output_dir), run_id, init_adapter, stop_path
    )
    run = RunLogger(run_id)
    run.artifact(result.loss_curve_png, "finetune")
    run.metrics(
        {
            "finetune.global_step": result.global_step,
            "finetune.train_seconds": result.train_seconds,
            "finetune.train_tokens": result.train_tokens,
            "finetune.trainable_parameters": result.trainable_parameters,
            **(
                {"finetune.best_stop_loss": result.best_stop_loss}
                if result.best_stop_loss is not None
                else {}
            ),
        }
    )
    run.tags(
        {
            "finetune.resumed_from": result.resumed_from or "none",
            "finetune.started_from": started_from(start),
            "finetune.device": result.device,
            "finetune.compute_dtype": result.compute_dtype,
        }
    )
    return result
