"""Loading a base model (plus adapter) for inference, and batched chat generation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from components.device import select_compute_dtype, select_device


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int


def load_for_inference(base_path: str, adapter_dir: str | None = None,
                       device: str = "auto") -> tuple[Any, Any]:
    """Base model with the adapter merged in (faster decoding), and a left-padding tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = select_device(device)
    dtype = select_compute_dtype(device)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir or base_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
    model: Any = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    model.to(device).eval()
    return model, tokenizer


def _truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def generate_chat(model: Any, tokenizer: Any, conversations: Sequence[list[dict[str, str]]],
                  max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                  stop: Sequence[str] = ()) -> list[Generation]:
    """Generate one answer per conversation in a single batched `generate` call."""
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
               for c in conversations]
    return generate_text(model, tokenizer, prompts, max_new_tokens, temperature, top_p, stop)


def generate_text(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                  temperature: float = 0.0, top_p: float = 1.0,
                  stop: Sequence[str] = ()) -> list[Generation]:
    """Continue each already-templated prompt; greedy when temperature is 0."""
    batch = tokenizer(list(prompts), return_tensors="pt", padding=True,
                      add_special_tokens=False).to(model.device)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} \
        if temperature > 0 else {"do_sample": False}
    output = model.generate(**batch, max_new_tokens=max_new_tokens,
                            pad_token_id=tokenizer.pad_token_id, **sampling)
    new_tokens = output[:, batch["input_ids"].shape[1]:]
    results = []
    for row, mask in zip(new_tokens, batch["attention_mask"], strict=True):
        ids = row.tolist()
        if tokenizer.eos_token_id in ids:  # everything after the end of turn is padding
            ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        results.append(Generation(text=_truncate_at_stop(text, stop),
                                  prompt_tokens=int(mask.sum()), completion_tokens=len(ids)))
    return results


def answer_log_likelihoods(model: Any, tokenizer: Any, examples: Sequence[Any],
                           batch_size: int) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, token count) of each reference answer, for perplexity."""
    import torch

    from components.chat import IGNORE_INDEX, tokenize_for_training

    out: list[tuple[float, int]] = []
    for start in range(0, len(examples), batch_size):
        rows = [tokenize_for_training(tokenizer, e, max_len=4096)
                for e in examples[start:start + batch_size]]
        width = max(len(r["input_ids"]) for r in rows)
        pad = tokenizer.pad_token_id

        def padded(key: str, fill: int, rows: list = rows, width: int = width) -> Any:
            return torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows],
                                device=model.device)

        input_ids, attention, labels = (padded("input_ids", pad), padded("attention_mask", 0),
                                        padded("labels", IGNORE_INDEX))
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="none").view(shift_labels.shape)
        counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
        out.extend((float(n), int(c)) for n, c in zip(nll.sum(dim=1), counts, strict=True))
    return out
