import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from components.model.chat import IGNORE_INDEX, prompt_ids, tokenize_for_training
from components.records import Example, save_examples

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = [
    Example(
        instruction=f"How do I run stage {i}?",
        output=f"Run the flow for stage {i} with make train.",
    )
    for i in range(16)
]


@pytest.fixture
def train_file(tmp_path: Path) -> str:
    path = tmp_path / "train.jsonl"
    save_examples(path, EXAMPLES)
    return str(path)


def test_only_answer_tokens_carry_loss(tokenizer) -> None:
    example = EXAMPLES[0]
    row = tokenize_for_training(tokenizer, example, max_len=512)
    n_prompt = len(prompt_ids(tokenizer, example))
    assert all(label == IGNORE_INDEX for label in row["labels"][:n_prompt])
    answer = [t for t in row["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(answer).strip() == example.output + tokenizer.eos_token
    assert len(row["labels"]) == len(row["input_ids"])


def test_lora_trains_adapters_and_leaves_base_frozen(
    tmp_path, train_file, tiny_base, tiny_config
) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from components.train.finetune import finetune

    base_before = load_file(str(Path(tiny_base.path) / "model.safetensors"))
    result = finetune(tiny_config, tiny_base, train_file, None, tmp_path / "ft")

    assert result.global_step == tiny_config.train.max_steps
    assert result.last_loss < result.first_loss  # the loss went down
    assert Path(result.loss_curve_png).stat().st_size > 1000
    assert (Path(result.adapter_dir) / "tokenizer_config.json").is_file()
    assert 0 < result.trainable_parameters < result.total_parameters
    saved = load_file(str(Path(result.adapter_dir) / "adapter_model.safetensors"))
    assert saved and all("lora_" in key for key in saved)  # only adapters were trained and kept

    model = AutoModelForCausalLM.from_pretrained(tiny_base.path)
    untouched = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = PeftModel.from_pretrained(model, result.adapter_dir)
    lora_b = [v for k, v in peft_model.state_dict().items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero; it moved
    for key, value in base_before.items():  # the base weights were not modified
        assert torch.equal(untouched[key], value)
    merged = peft_model.merge_and_unload().state_dict()
    assert any(not torch.equal(merged[k], untouched[k]) for k in untouched if "proj" in k)


def test_training_stops_when_the_held_out_rewrites_stop_improving(
    tmp_path, train_file, tiny_base, tiny_config
) -> None:
    """The early-stopping set contradicts the training answers, so its loss turns up once
    they are learned: training stops `patience` evaluations after the best, and keeps it."""
    from safetensors.torch import load_file

    from components.train.finetune import finetune

    stop = tmp_path / "stop.jsonl"
    save_examples(stop, [Example(e.instruction, "Never: ask the on-call first.") for e in EXAMPLES])
    config = tiny_config.model_copy(
        update={
            "train": tiny_config.train.model_copy(update={"max_steps": 40}),
            "recipe": tiny_config.recipe.model_copy(
                update={"stop_variants": 1, "early_stopping_patience": 2, "stop_eval_steps": 2}
            ),
        }
    )
    result = finetune(config, tiny_base, train_file, None, tmp_path / "ft", stop_path=str(stop))

    evals = [
        (h["step"], h["eval_loss"])
        for h in json.loads((tmp_path / "ft" / "log_history.json").read_text())
        if "eval_loss" in h
    ]
    assert [step for step, _ in evals] == list(range(2, result.global_step + 1, 2))
    best_step, best = min(evals, key=lambda e: e[1])
    assert result.best_stop_loss == pytest.approx(best)
    assert result.global_step == best_step + 2 * 2 < 40  # stopped early
    kept = load_file(str(Path(result.adapter_dir) / "adapter_model.safetensors"))
    at_best = load_file(
        str(tmp_path / "ft" / f"checkpoint-{best_step}" / "adapter_model.safetensors")
    )
    assert kept.keys() == at_best.keys() and all((kept[k] == at_best[k]).all() for k in kept)


def test_qlora_path_runs_on_cpu_in_float32(tmp_path, train_file, tiny_base, tiny_config) -> None:
    from components.train.finetune import finetune

    config = tiny_config.model_copy(
        update={
            "quantization": tiny_config.quantization.model_copy(update={"load_in_4bit": True}),
            "train": tiny_config.train.model_copy(
                update={"gradient_checkpointing": True, "max_steps": 3}
            ),
        }
    )
    result = finetune(config, tiny_base, train_file, None, tmp_path / "ft4")
    assert result.compute_dtype == "float32"  # bf16 on this CPU would be ~15x slower
    assert result.global_step == 3
    assert (Path(result.adapter_dir) / "adapter_model.safetensors").is_file()


def test_qlora_loads_the_base_in_4_bit(tiny_base, tiny_config) -> None:
    """The QLoRA path really quantizes: every linear layer of the blocks is a packed 4-bit
    layer with its NF4 state, and the weights take a fraction of the float32 footprint."""
    import bitsandbytes as bnb
    import torch

    from components.train.finetune import load_base_for_training

    quant = tiny_config.quantization.model_copy(update={"load_in_4bit": True})
    four_bit, dtype = load_base_for_training(tiny_base, quant, "cpu", False)
    full, _ = load_base_for_training(tiny_base, tiny_config.quantization, "cpu", False)
    layers = [m for m in four_bit.modules() if isinstance(m, bnb.nn.Linear4bit)]
    linear_in_full = [
        n for n, m in full.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    ]
    assert dtype == torch.float32 and len(layers) == len(linear_in_full) > 0
    assert all(layer.weight.quant_state.quant_type == "nf4" for layer in layers)
    assert all(layer.weight.dtype == torch.uint8 for layer in layers)

    def block_bytes(model) -> int:
        return sum(
            p.numel() * p.element_size() for n, p in model.named_parameters() if "layers" in n
        )

    assert block_bytes(four_bit) < block_bytes(full) / 3


@pytest.mark.gpu
def test_gpu_qlora_profile_trains_in_bf16(tmp_path, train_file) -> None:
    from components.config import load_profile
    from components.model.base_model import resolve_base_model
    from components.train.finetune import finetune

    config = load_profile("gpu-qlora")
    config = config.model_copy(
        update={"train": config.train.model_copy(update={"max_steps": 4, "batch_size": 4})}
    )
    result = finetune(config, resolve_base_model(config.model), train_file, None, tmp_path / "gpu")
    assert result.device == "cuda" and result.compute_dtype == "bfloat16"
    assert result.last_loss < result.first_loss


@pytest.mark.gpu
def test_gpu_fsdp_profile_shards_qlora_over_the_gpus(tmp_path, train_file) -> None:
    import torch

    from components.config import load_profile
    from components.model.base_model import resolve_base_model
    from components.train.launch import launched_finetune

    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs two CUDA GPUs, this machine has {torch.cuda.device_count()}")
    config = load_profile("gpu-fsdp")
    config = config.model_copy(
        update={"train": config.train.model_copy(update={"max_steps": 4, "batch_size": 4})}
    )
    base = resolve_base_model(config.model)
    result = launched_finetune(config, base, train_file, None, tmp_path / "fsdp")
    assert result.device == "cuda" and result.global_step == 4
    assert (Path(result.adapter_dir) / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_killed_run_resumes_from_last_checkpoint(
    tmp_path, train_file, tiny_base, tiny_config
) -> None:
    """SIGKILL a real training process after its first checkpoint, then run again."""
    from components.train.finetune import finetune

    config = tiny_config.model_copy(
        update={
            "train": tiny_config.train.model_copy(
                update={"max_steps": 40, "save_steps": 2, "save_total_limit": 50, "batch_size": 2}
            )
        }
    )
    output = tmp_path / "ft"
    script = textwrap.dedent(f"""
        from pathlib import Path
        from components.model.base_model import BaseModelRef
        from components.config import PipelineConfig
        from components.train.finetune import finetune
        config = PipelineConfig.model_validate_json({config.model_dump_json()!r})
        base = BaseModelRef(**{tiny_base.to_dict()!r})
        finetune(config, base, {train_file!r}, None, Path({str(output)!r}))
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=os.environ.copy(),
    )
    deadline = time.monotonic() + 120
    # Kill once checkpoint-4 is complete (trainer_state.json is written last); a later
    # checkpoint may be half-written at the moment of the kill, which resume must survive.
    while (
        time.monotonic() < deadline
        and not (output / "checkpoint-4" / "trainer_state.json").is_file()
    ):
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    checkpoints = sorted(int(p.name.split("-")[1]) for p in output.glob("checkpoint-*"))
    assert checkpoints and checkpoints[-1] < 40, "the kill came after training finished"

    result = finetune(config, tiny_base, train_file, None, output)
    assert result.resumed_from is not None
    assert int(result.resumed_from.rsplit("-", 1)[1]) >= 4
    assert result.global_step == 40


def test_partial_checkpoint_is_skipped_and_removed(tmp_path) -> None:
    from components.train.finetune import last_complete_checkpoint

    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "optimizer.pt").write_bytes(b"x")
        if complete:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text('{"global_st')  # cut off

    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    assert last_complete_checkpoint(tmp_path / "missing") is None


@pytest.mark.e2e
def test_accelerate_launch_trains_in_two_processes_with_the_shipped_config(
    home, tmp_path, train_file, tiny_base, tiny_config
) -> None:
    """The launch path of `train.accelerate_config`, run here on two CPU processes with the
    shipped DDP config (accelerate runs FSDP on GPUs only, so fsdp-qlora.yaml is checked by
    the GPU test; the code path is the same). Each step then sees twice the examples, the
    main process alone writes the adapter, and the trainer's logs reach the MLflow run."""
    from mlflow import MlflowClient
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from components.registry.tracking import RunLogger
    from components.train.finetune import finetune
    from components.train.launch import launched_finetune

    shipped = "deployments/accelerate/ddp.yaml"
    config = tiny_config.model_copy(
        update={"train": tiny_config.train.model_copy(update={"accelerate_config": shipped})}
    )
    run = RunLogger.start("flywheel", "launch-test", {"profile": "tiny"})
    two = launched_finetune(config, tiny_base, train_file, None, tmp_path / "two", run.run_id)
    one = finetune(tiny_config, tiny_base, train_file, None, tmp_path / "one")

    assert two.global_step == one.global_step == tiny_config.train.max_steps
    assert two.train_tokens == 2 * one.train_tokens  # two processes, a batch each per step
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_base.path), two.adapter_dir
    )
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in model.state_dict().items())
    losses = MlflowClient().get_metric_history(run.run_id, "train.loss")
    assert len(losses) == tiny_config.train.max_steps  # logged once, by the main process
    assert Path(two.loss_curve_png).is_file()


@pytest.mark.e2e
def test_a_failed_launch_says_why(tmp_path, tiny_base, tiny_config) -> None:
    from components.train.launch import launched_finetune

    config = tiny_config.model_copy(
        update={
            "train": tiny_config.train.model_copy(
                update={"accelerate_config": "deployments/accelerate/ddp.yaml"}
            )
        }
    )
    with pytest.raises(RuntimeError, match=r"accelerate launch exited with 1: .*missing\.jsonl"):
        launched_finetune(config, tiny_base, str(tmp_path / "missing.jsonl"), None, tmp_path)
