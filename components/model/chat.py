"""The tokenizer and its chat template: loading, rendering a conversation, and turning
examples into token ids for training."""

from __future__ import annotations

from typing import Any

from components.records import Example

IGNORE_INDEX = -100


def _ids(encoded: Any) -> list[int]:
    # apply_chat_template returns a list, or a BatchEncoding, depending on the version.
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def prompt_ids(tokenizer: Any, example: Example) -> list[int]:
    """Token ids of the prompt, ending with the assistant header the model answers after."""
    return _ids(
        tokenizer.apply_chat_template(
            example.messages(with_answer=False), add_generation_prompt=True, tokenize=True
        )
    )


def tokenize_for_training(tokenizer: Any, example: Example, max_len: int) -> dict[str, list[int]]:
    """input_ids and labels where only the answer tokens (and end of turn) carry loss."""
    prompt = prompt_ids(tokenizer, example)
    full = _ids(tokenizer.apply_chat_template(example.messages(), tokenize=True))
    if full[: len(prompt)] != prompt:
        raise ValueError(
            "the chat template renders the prompt differently with an answer; "
            "cannot mask the prompt tokens"
        )
    labels = [IGNORE_INDEX] * len(prompt) + full[len(prompt) :]
    return {
        "input_ids": full[:max_len],
        "attention_mask": [1] * min(len(full), max_len),
        "labels": labels[:max_len],
    }


def chat_token_counter(tokenizer: Any):
    """A function giving the full templated length of an example, for the length filter."""

    def count(example: Example) -> int:
        return len(_ids(tokenizer.apply_chat_template(example.messages(), tokenize=True)))

    return count


def load_tokenizer(path: str, padding_side: str = "right") -> Any:
    """The base model's tokenizer, with a pad token and the requested padding side."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        raise ValueError(f"tokenizer at {path} has no chat template; choose an instruct model")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The templated prompt text, ending where the assistant's answer starts."""
    return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
