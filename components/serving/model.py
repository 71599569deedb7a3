"""The model behind the service: resolve a registry URI, load, warm up, serve, swap.

Kept free of BentoML so it can be tested in-process; service/ wraps it in BentoML APIs.
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from components.config import PipelineConfig, ServeConfig, load_profile
from components.model.chat import render_chat
from components.model.generation import GenerationRequest, generate_requests, stream_request
from components.paths import flywheel_home


def serving_profile() -> PipelineConfig:
    """The profile the service runs with (`FLYWHEEL_PROFILE`, default cpu-small)."""
    return load_profile(os.environ.get("FLYWHEEL_PROFILE", "cpu-small"))


def serve_settings() -> ServeConfig:
    return serving_profile().serve


def default_model_uri() -> str:
    """`FLYWHEEL_MODEL_URI`, else the profile's registered model at alias `champion`."""
    return (
        os.environ.get("FLYWHEEL_MODEL_URI")
        or f"models:/{serving_profile().registry.model_name}@champion"
    )


class GenerationInput(BaseModel):
    """What the generator receives: chat messages (templated here) or raw text."""

    messages: list[dict[str, str]] | None = None
    text: str | None = None
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = []


class GenerationOutput(BaseModel):
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    confidence: float | None = None
    model_version: str = ""
    error: str | None = None
    error_param: str | None = None


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: str
    model: Any
    tokenizer: Any
    context_length: int


def resolve_model_uri(uri: str) -> tuple[str, str]:
    """`models:/name@alias` or `models:/name/version` -> (name, version)."""
    from components.registry.tracking import mlflow_client

    if not uri.startswith("models:/"):
        raise ValueError(
            f"model URI must look like models:/<name>@<alias> or "
            f"models:/<name>/<version>, got {uri!r}"
        )
    ref = uri.removeprefix("models:/")
    client = mlflow_client()
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, str(client.get_model_version_by_alias(name, alias).version)
    name, version = ref.rsplit("/", 1)
    return name, str(client.get_model_version(name, version).version)


def load_model_version(name: str, version: str) -> LoadedModel:
    """Download a registered version's adapter and load base + adapter for inference."""
    from components.model.generation import load_for_inference
    from components.registry.register import download_version

    cache = flywheel_home() / "serving" / name / version
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        base_path, adapter_dir = download_version(name, version, Path(tmp))
        model, tokenizer = load_for_inference(base_path, adapter_dir)
    context = int(getattr(model.config, "max_position_embeddings", 2048))
    return LoadedModel(name, version, model, tokenizer, context)


class ServedModel:
    """The current model; `swap` loads and warms the next one before switching to it."""

    def __init__(self, loaded: LoadedModel, warmup: bool = True) -> None:
        if warmup:
            self._warm(loaded)
        self._current = loaded
        self._lock = threading.Lock()
        # One model call at a time: concurrent generate calls on a CPU fight over the same
        # cores and are slower together than in turn. Batching is what adds throughput.
        self.compute = threading.Lock()

    @classmethod
    def from_uri(cls, uri: str, warmup: bool = True) -> ServedModel:
        return cls(load_model_version(*resolve_model_uri(uri)), warmup)

    @property
    def current(self) -> LoadedModel:
        return self._current

    @staticmethod
    def _warm(loaded: LoadedModel) -> None:
        # The first generate call pays for lazy initialisation; do it before taking traffic.
        run_inputs(
            loaded,
            [GenerationInput(messages=[{"role": "user", "content": "Hello"}], max_new_tokens=2)],
        )

    def swap(self, uri: str) -> LoadedModel:
        """Load and warm the model at `uri`, then switch; in-flight calls finish on the old."""
        loaded = load_model_version(*resolve_model_uri(uri))
        self._warm(loaded)
        with self._lock:
            self._current = loaded
        return loaded

    def generate(self, inputs: list[GenerationInput]) -> list[GenerationOutput]:
        with self.compute:
            return run_inputs(self._current, inputs)


def _prompt_text(loaded: LoadedModel, item: GenerationInput) -> str:
    if item.messages is not None:
        return render_chat(loaded.tokenizer, item.messages)
    return item.text or ""


def check_input(loaded: LoadedModel, item: GenerationInput) -> tuple[str, int] | GenerationOutput:
    """(prompt text, prompt tokens), or an error output naming the offending field."""
    param = "messages" if item.messages is not None else "prompt"
    try:
        prompt = _prompt_text(loaded, item)
    except Exception as exc:  # a template that rejects this conversation
        return GenerationOutput(error=f"cannot apply the chat template: {exc}", error_param=param)
    n_tokens = len(loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if n_tokens + item.max_new_tokens > loaded.context_length:
        return GenerationOutput(
            error=(
                f"the prompt is {n_tokens} tokens; with max_new_tokens "
                f"{item.max_new_tokens} it exceeds the model's context of "
                f"{loaded.context_length} tokens"
            ),
            error_param=param,
        )
    return prompt, n_tokens


def run_inputs(loaded: LoadedModel, inputs: list[GenerationInput]) -> list[GenerationOutput]:
    """Generate for every valid input in batched calls; invalid ones get an error output."""
    outputs: list[GenerationOutput | None] = [None] * len(inputs)
    valid: list[tuple[int, GenerationRequest]] = []
    for i, item in enumerate(inputs):
        checked = check_input(loaded, item)
        if isinstance(checked, GenerationOutput):
            outputs[i] = checked
        else:
            valid.append(
                (
                    i,
                    GenerationRequest(
                        prompt=checked[0],
                        max_new_tokens=item.max_new_tokens,
                        temperature=item.temperature,
                        top_p=item.top_p,
                        stop=tuple(item.stop),
                    ),
                )
            )
    if valid:
        results = generate_requests(loaded.model, loaded.tokenizer, [r for _, r in valid])
        for (i, _), result in zip(valid, results, strict=True):
            outputs[i] = GenerationOutput(
                text=result.text,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                confidence=result.confidence,
                model_version=loaded.version,
            )
    return [o if o is not None else GenerationOutput(error="not generated") for o in outputs]


def stream_input(loaded: LoadedModel, item: GenerationInput):  # -> Iterator[GenerationOutput]
    """Pieces of the answer as outputs; the last one carries the token counts."""
    checked = check_input(loaded, item)
    if isinstance(checked, GenerationOutput):
        yield checked
        return
    prompt, n_prompt = checked
    request = GenerationRequest(
        prompt=prompt,
        max_new_tokens=item.max_new_tokens,
        temperature=item.temperature,
        top_p=item.top_p,
        stop=tuple(item.stop),
    )
    text = ""
    for piece in stream_request(loaded.model, loaded.tokenizer, request):
        text += piece
        yield GenerationOutput(text=piece, model_version=loaded.version)
    completion = len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
    yield GenerationOutput(
        text="", prompt_tokens=n_prompt, completion_tokens=completion, model_version=loaded.version
    )
