"""Fine-tune: LoRA or QLoRA on the base model with the chat template, loss on answers only.

QLoRA is a config value (`quantization.load_in_4bit`), handled in `load_base_for_training`;
the rest of the code path is the same. Runs are seeded and checkpointed; calling `finetune`
again with the same `output_dir` resumes from the last checkpoint. The same code runs in each
process of `accelerate launch` (components/train/launch.py): the trainer shards the batches,
and the main process alone writes the adapter and the run's files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from components.config import LoraSettings, PipelineConfig, QuantizationConfig
from components.model.base_model import BaseModelRef
from components.model.chat import load_tokenizer, tokenize_for_training
from components.model.device import select_compute_dtype, select_device
from components.plots import plot_loss_curve
from components.records import load_examples
from components.train.recipe import epochs

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    """Where the adapter is, and what training did."""

    adapter_dir: str
    output_dir: str
    loss_curve_png: str
    global_step: int
    resumed_from: str | None
    first_loss: float
    last_loss: float
    eval_loss: float | None  # on the validation split
    best_stop_loss: float | None  # the early-stopping set's, at the kept checkpoint
    train_seconds: float
    train_tokens: int
    trainable_parameters: int
    total_parameters: int
    device: str
    compute_dtype: str
    started_from: str  # "base", or the adapter folder training continued

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def last_complete_checkpoint(output_dir: Path) -> str | None:
    """The newest checkpoint that was fully written, or None.

    A run killed while saving leaves a partial `checkpoint-N` (the trainer writes
    `trainer_state.json` last); such a folder is removed, with a warning, so that resuming
    and checkpoint rotation do not trip over it.
    """
    checkpoints = sorted(
        output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]), reverse=True
    )
    for checkpoint in checkpoints:
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
            if (checkpoint / "optimizer.pt").is_file():
                return str(checkpoint)
        except (OSError, ValueError):
            pass
        log.warning(
            "removing incomplete checkpoint %s (the run stopped while saving it)", checkpoint
        )
        shutil.rmtree(checkpoint)
    return None


def fsdp_launched() -> bool:
    """Whether `accelerate launch` started this process with an FSDP config."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def load_base_for_training(
    base: BaseModelRef, quant: QuantizationConfig, device: str, gradient_checkpointing: bool
) -> tuple[Any, Any]:
    """Load the base model in full precision, or in 4-bit for QLoRA; returns (model, dtype).

    Under FSDP the weights stay on the CPU until FSDP shards them onto the GPUs, and 4-bit
    weights are stored in the compute dtype, the one dtype FSDP can shard."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = select_compute_dtype(device, quant.compute_dtype)
    fsdp = fsdp_launched() and device == "cuda"
    if not quant.load_in_4bit:
        model: Any = AutoModelForCausalLM.from_pretrained(base.path, dtype=dtype)
        return (model if fsdp else model.to(device)), dtype
    from peft import prepare_model_for_kbit_training

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype if fsdp else torch.uint8,
    )
    model = AutoModelForCausalLM.from_pretrained(
        base.path,
        quantization_config=bnb,
        device_map=None if fsdp else {"": local_device(device)},
        dtype=dtype,
    )
    if fsdp:  # kbit preparation upcasts some weights to float32, which FSDP cannot shard
        return model, dtype
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    return model, dtype


def local_device(device: str) -> str | int:
    """This process's device: under `accelerate launch` on CUDA, the GPU of its local rank."""
    return int(os.environ.get("LOCAL_RANK", "0")) if device == "cuda" else device


def attach_lora(model: Any, settings: LoraSettings) -> Any:
    """Wrap the model with trainable LoRA adapters; base weights stay frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def continuable(adapter_dir: str, settings: LoraSettings) -> bool:
    """Whether a saved adapter has the profile's LoRA shape, so training can continue it."""
    try:
        saved = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return False
    return saved.get("r") == settings.r and saved.get("lora_alpha") == settings.alpha


def lora_model(model: Any, settings: LoraSettings, init_adapter: str | None) -> tuple[Any, str]:
    """The model with trainable adapters: `init_adapter` continued (see `continuable`), else
    fresh ones; returns (model, where training starts)."""
    if init_adapter is None:
        return attach_lora(model, settings), "base"
    from peft import PeftModel

    return PeftModel.from_pretrained(model, init_adapter, is_trainable=True), init_adapter


def _dataset(tokenizer: Any, path: str, max_len: int) -> list[dict[str, list[int]]]:
    """Tokenized rows; a list is all the trainer needs from a map-style dataset."""
    return [tokenize_for_training(tokenizer, e, max_len) for e in load_examples(Path(path))]


def _loss_callback(on_log: Any) -> Any:
    from transformers import TrainerCallback

    class ForwardLogs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            # The progress printer formats `logs` in place; log_history keeps the numbers.
            if state.log_history and state.is_world_process_zero:
                latest = state.log_history[-1]
                on_log(
                    {k: v for k, v in latest.items() if isinstance(v, int | float) and k != "step"},
                    state.global_step,
                )

    return ForwardLogs()


def finetune(
    config: PipelineConfig,
    base: BaseModelRef,
    train_path: str,
    validation_path: str | None,
    output_dir: Path,
    on_log: Any = None,
    extra_callbacks: list[Any] | None = None,
    init_adapter: str | None = None,
    stop_path: str | None = None,
) -> FinetuneResult:
    """Train LoRA adapters and save them (with the tokenizer) to `output_dir/adapter`.

    `init_adapter`: an adapter to continue (the champion's, for a retrain) instead of fresh
    ones. `stop_path`: the recipe's early-stopping set; with `recipe.early_stopping_patience`
    its loss is measured every `recipe.stop_eval_steps` steps, training stops once it no
    longer improves, and the best checkpoint is kept. `on_log(metrics, step)` receives the
    trainer's logs (loss, learning rate, ...) as they come.
    """
    from transformers import (
        DataCollatorForSeq2Seq,
        EarlyStoppingCallback,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    train_cfg = config.train
    device = select_device(train_cfg.device)
    set_seed(train_cfg.seed)
    tokenizer = load_tokenizer(base.path)
    model, dtype = load_base_for_training(
        base, config.quantization, device, train_cfg.gradient_checkpointing
    )
    model, started_from = lora_model(model, config.lora, init_adapter)
    trainable, total = model.get_nb_trainable_parameters()

    train_set = _dataset(tokenizer, train_path, train_cfg.max_seq_len)
    eval_rows = (
        _dataset(tokenizer, validation_path, train_cfg.max_seq_len) if validation_path else []
    )
    recipe = config.recipe
    stop_rows = _dataset(tokenizer, stop_path, train_cfg.max_seq_len) if stop_path else []
    stopping = bool(recipe.early_stopping_patience and stop_rows)
    save_steps = recipe.stop_eval_steps if stopping else train_cfg.save_steps

    output_dir.mkdir(parents=True, exist_ok=True)
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=train_cfg.batch_size,
        per_device_eval_batch_size=train_cfg.batch_size,
        gradient_accumulation_steps=train_cfg.gradient_accumulation_steps,
        learning_rate=train_cfg.learning_rate,
        num_train_epochs=epochs(len(train_set), train_cfg, recipe),
        max_steps=train_cfg.max_steps,
        warmup_steps=train_cfg.warmup_ratio,
        weight_decay=train_cfg.weight_decay,
        logging_steps=train_cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=train_cfg.save_total_limit,
        eval_strategy="steps" if stopping else "no",
        eval_steps=save_steps,
        load_best_model_at_end=stopping,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        seed=train_cfg.seed,
        data_seed=train_cfg.seed,
        use_cpu=device == "cpu",
        bf16=device == "cuda" and str(dtype) == "torch.bfloat16",
        fp16=device == "cuda" and str(dtype) == "torch.float16",
        gradient_checkpointing=train_cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        optim="adamw_torch",
        report_to="none",
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,  # frozen base weights get no gradient, by design
    )
    callbacks = list(extra_callbacks or [])
    if on_log is not None:
        callbacks.append(_loss_callback(on_log))
    if stopping:
        callbacks.append(EarlyStoppingCallback(recipe.early_stopping_patience))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=stop_rows or None,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    with args.main_process_first(local=False):  # one process tidies, all resume alike
        resume_from = last_complete_checkpoint(output_dir)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - started
    eval_loss = trainer.evaluate(eval_rows)["eval_loss"] if eval_rows else None  # type: ignore[arg-type]

    adapter_dir = output_dir / "adapter"
    history = trainer.state.log_history
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    png = output_dir / "loss_curve.png"
    # FSDP holds a shard of the adapter in each process: all of them join the gather.
    fsdp = trainer.is_fsdp_enabled
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if fsdp else None
    if trainer.is_world_process_zero():
        trained: Any = trainer.accelerator.unwrap_model(trainer.model)
        trained.save_pretrained(adapter_dir, state_dict=state_dict)
        tokenizer.save_pretrained(adapter_dir)
        (output_dir / "log_history.json").write_text(json.dumps(history, indent=1))
        plot_loss_curve(losses, png, title=f"{config.name}: training loss")
    trainer.accelerator.wait_for_everyone()
    return FinetuneResult(
        adapter_dir=str(adapter_dir),
        output_dir=str(output_dir),
        loss_curve_png=str(png),
        global_step=trainer.state.global_step,
        resumed_from=resume_from,
        first_loss=losses[0][1] if losses else float("nan"),
        last_loss=losses[-1][1] if losses else float("nan"),
        eval_loss=eval_loss,
        best_stop_loss=trainer.state.best_metric if stopping else None,
        train_seconds=round(seconds, 2),
        train_tokens=int(trainer.state.num_input_tokens_seen),
        trainable_parameters=int(trainable),
        total_parameters=int(total),
        device=device,
        compute_dtype=str(dtype).removeprefix("torch."),
        started_from=started_from,
    )
