"""The model behind the service: resolve a registry URI, load, warm up, serve, swap.

Kept free of BentoML so it can be tested in-process; service/ wraps it in BentoML APIs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from components.config import PipelineConfig, ServeConfig, load_profile
from components.model.chat import render_chat
from components.model.generation import Generation, GenerationRequest
from components.paths import flywheel_home
from components.serving.cache import CachedAnswer, Lookup, ResponseCache, cacheable
from components.serving.engine import Engine

log = logging.getLogger("flywheel.generator")


def serving_profile() -> PipelineConfig:
    """The profile the service runs with (`FLYWHEEL_PROFILE`, default cpu-small)."""
    return load_profile(os.environ.get("FLYWHEEL_PROFILE", "cpu-small"))


def serve_settings() -> ServeConfig:
    return serving_profile().serve


def default_model_uri(config: PipelineConfig | None = None) -> str:
    """`FLYWHEEL_MODEL_URI`, else the profile's `serve.models.champion` (its registered model
    at alias `champion` unless the profile says otherwise)."""
    config = config or serving_profile()
    return os.environ.get("FLYWHEEL_MODEL_URI") or config.serve.models["champion"]


class GenerationInput(BaseModel):
    """What the generator receives: chat messages (templated here) or raw text."""

    messages: list[dict[str, str]] | None = None
    text: str | None = None
    # Which served model answers (a name in `serve.models`, or `canary`); None: the
    # champion, or the canary for its share of users (`user` keeps a user on one of them).
    model: str | None = None
    routed: bool = False  # `model` is the router's choice: the champion answers without it
    user: str | None = None
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
    model: str = ""  # the name of the served model that answered
    error: str | None = None
    error_param: str | None = None
    error_code: str | None = None
    error_status: int = 400  # the HTTP status the gateway answers the error with
    cache: Lookup = "off"  # what the response cache did: hit, miss, error (unreachable), off


def _failed(message: str, code: str, status: int = 400) -> GenerationOutput:
    return GenerationOutput(error=message, error_code=code, error_status=status)


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: str
    engine: Engine
    tokenizer: Any
    context_length: int
    fallback: str | None = None  # why the configured engine is not the one serving
    quality: str | None = None  # the converted engine's quality check, when it serves


class ModelNotFound(LookupError):
    """The registry has no such model version or alias."""


BASE = "base"  # the source, and the version label, of the base model served without adapter


def resolve_model_uri(uri: str, config: PipelineConfig | None = None) -> tuple[str, str]:
    """A model source -> (name, version): `models:/name@alias`, `models:/name/version`,
    `@alias` (of the profile's registered model), or `base` (the profile's base model, version
    label `base`)."""
    from components.registry.tracking import mlflow_client

    config = config or serving_profile()
    if uri == BASE:
        return config.model.base_model, BASE
    if uri.startswith("@"):
        uri = f"models:/{config.registry.model_name}{uri}"
    if not uri.startswith("models:/"):
        raise ValueError(
            f"model URI must look like models:/<name>@<alias>, models:/<name>/<version>, "
            f"@<alias> or base, got {uri!r}"
        )
    from mlflow.exceptions import MlflowException

    from components.paths import tracking_uri

    ref = uri.removeprefix("models:/")
    client = mlflow_client()
    name, sep, alias = ref.partition("@")
    try:
        if sep:
            return name, str(client.get_model_version_by_alias(name, alias).version)
        name, version = ref.rsplit("/", 1)
        return name, str(client.get_model_version(name, version).version)
    except MlflowException:
        what = f"no {alias} for {name}" if sep else f"no version {ref}"
        raise ModelNotFound(f"{what} in {tracking_uri()}: run make train first") from None


def load_model_version(name: str, version: str, config: PipelineConfig) -> LoadedModel:
    """Load a registered version (its adapter over its base), or the profile's base model
    alone (version `base`), on the configured engine; if the engine cannot take it, load it on
    the transformers reference and say why."""
    from transformers import AutoConfig

    from components.model.chat import load_tokenizer

    with _weights(name, version, config) as (cache, base_path, adapter_dir):
        tokenizer = load_tokenizer(adapter_dir or base_path, padding_side="left")
        architecture = AutoConfig.from_pretrained(base_path)
        context = int(getattr(architecture, "max_position_embeddings", 2048))
        loaded, fallback = None, None
        if config.serve.engine.name == "openvino":
            try:
                served, quality = openvino_engine(cache, base_path, adapter_dir, tokenizer, config)
                loaded = LoadedModel(name, version, served, tokenizer, context, quality=quality)
            except Exception as exc:
                fallback = f"cannot serve version {version} on OpenVINO: {exc}"
                log.warning("%s; serving it on transformers", fallback)
        if loaded is None:
            reference = transformers_engine(base_path, adapter_dir)
            loaded = LoadedModel(name, version, reference, tokenizer, context, fallback)
    if version != BASE:
        record_engine(loaded)
    return loaded


@contextlib.contextmanager
def _weights(
    name: str, version: str, config: PipelineConfig
) -> Iterator[tuple[Path, str, str | None]]:
    """(the version's cache folder, base model folder, adapter folder or None), the adapter
    downloaded into a temporary folder that lasts while the model loads."""
    if version == BASE:
        from components.model.base_model import resolve_base_model

        base = resolve_base_model(config.model)
        cache = flywheel_home() / "serving" / BASE / base.sha256[:16]
        cache.mkdir(parents=True, exist_ok=True)
        yield cache, base.path, None
        return
    from components.registry.register import download_version

    cache = flywheel_home() / "serving" / name / version
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        base_path, adapter_dir = download_version(name, version, Path(tmp))
        yield cache, base_path, adapter_dir


def prepare_version(name: str, version: str, config: PipelineConfig) -> str:
    """Convert and check a version for the profile's engine ahead of serving it, so that the
    service loads it in seconds (the deploy flow runs this); says what will serve it."""
    if config.serve.engine.name == "transformers":
        return "engine: transformers (the reference)"
    loaded = load_model_version(name, version, config)
    loaded.engine.close()
    return f"engine: {loaded.engine.name} ({loaded.fallback or loaded.quality})"


def openvino_engine(
    cache: Path, base_path: str, adapter_dir: str | None, tokenizer: Any, config: PipelineConfig
) -> tuple[Engine, str]:
    """The version on OpenVINO, once its answers passed the quality check (and the check's
    summary); `EngineRejected` if they did not."""
    from components.serving.convert import openvino_folder
    from components.serving.engine import OpenVINOEngine
    from components.serving.quality import EngineRejected, check_engine, checked_once

    engine = config.serve.engine
    folder = openvino_folder(cache, base_path, adapter_dir, engine.weights)
    served = OpenVINOEngine(folder, tokenizer, engine)
    quality = checked_once(
        folder,
        lambda: check_engine(served, tokenizer, base_path, adapter_dir, config),
    )
    log.info("quality check: %s", quality.summary())
    if not quality.passed:
        served.close()
        raise EngineRejected(quality.summary())
    return served, quality.summary()


def record_engine(loaded: LoadedModel) -> None:
    """Say on the registered version which engine serves it, and why."""
    from components.registry.tracking import mlflow_client

    tags = {"serving.engine": loaded.engine.name}
    if loaded.quality:
        tags["serving.quality"] = loaded.quality
    if loaded.fallback:
        tags["serving.fallback"] = loaded.fallback
    try:
        client = mlflow_client()
        for key, value in tags.items():
            client.set_model_version_tag(loaded.name, loaded.version, key, value[:5000])
    except Exception as exc:  # the registry being away never stops serving
        log.warning("could not record the engine on version %s: %s", loaded.version, exc)


def transformers_engine(base_path: str, adapter_dir: str | None) -> Engine:
    from components.model.generation import load_for_inference
    from components.serving.engine import TransformersEngine

    return TransformersEngine(*load_for_inference(base_path, adapter_dir))


class ServedModel:
    """One served model; `swap` loads and warms the next one before switching to it. Until a
    model is in, `ready` is False and every call answers `model_not_ready`, so the service can
    say so at once instead of hanging."""

    def __init__(
        self,
        warmup: bool = True,
        config: PipelineConfig | None = None,
        cache: ResponseCache | None = None,
    ) -> None:
        self.warmup = warmup
        self.config = config or serving_profile()
        self._current: LoadedModel | None = None
        self.error: str | None = None
        self.cache = cache or ResponseCache.from_config(
            self.config.serve.cache, self.config.registry.model_name
        )

    @classmethod
    def from_uri(
        cls, uri: str, warmup: bool = True, config: PipelineConfig | None = None
    ) -> ServedModel:
        """Load `uri` now (in this thread)."""
        served = cls(warmup, config)
        served.swap(uri)
        return served

    def load(self, uri: str, admit: Callable[[LoadedModel], None] | None = None) -> bool:
        """`swap` to `uri`, keeping why it failed in `error` instead of raising."""
        try:
            self.swap(uri, admit)
        except ModelNotFound as exc:
            self.error = str(exc)
            log.error("%s", exc)
        except Exception as exc:
            self.error = f"cannot load {uri}: {exc}"
            log.exception("cannot load %s", uri)
        return self.error is None

    @property
    def ready(self) -> bool:
        return self._current is not None

    @property
    def loaded(self) -> LoadedModel | None:
        """The model serving now, if any."""
        return self._current

    @property
    def current(self) -> LoadedModel:
        if self._current is None:
            raise ModelNotReady(self.error or "the model is still loading")
        return self._current

    def _warm(self, loaded: LoadedModel) -> None:
        # The first generate call pays for lazy initialisation; do it before taking traffic.
        if self.warmup:
            hello = GenerationInput(
                messages=[{"role": "user", "content": "Hello"}], max_new_tokens=2
            )
            run_inputs(loaded, [hello])

    def swap(self, uri: str, admit: Callable[[LoadedModel], None] | None = None) -> LoadedModel:
        """Load and warm the model at `uri`, then switch; in-flight calls finish on the old.
        `admit` may refuse the loaded model (by raising) before it takes any traffic."""
        loaded = load_model_version(*resolve_model_uri(uri, self.config), self.config)
        try:
            if admit is not None:
                admit(loaded)
            self._warm(loaded)
        except BaseException:
            loaded.engine.close()
            raise
        previous, self._current = self._current, loaded  # atomic for readers
        self.error = None
        if previous is not None:
            previous.engine.close()  # once the requests it is running have finished
        return loaded

    def unload(self) -> None:
        """Stop serving: calls answer `model_not_ready`; those in flight finish."""
        previous, self._current = self._current, None
        self.error = "unloaded"
        if previous is not None:
            previous.engine.close()

    def generate(self, inputs: list[GenerationInput]) -> list[GenerationOutput]:
        try:
            loaded = self.current
        except ModelNotReady as exc:
            return [_failed(f"the model is not ready: {exc}", "model_not_ready", 503)] * len(inputs)
        return run_inputs(loaded, inputs, self.cache)

    def count_tokens(self, item: GenerationInput, answer: str) -> GenerationOutput:
        """`answer` (given by the correction memory) as an output with this model's token counts."""
        try:
            loaded = self.current
        except ModelNotReady as exc:
            return _failed(f"the model is not ready: {exc}", "model_not_ready", 503)
        checked = check_input(loaded, item)
        if isinstance(checked, GenerationOutput):
            return checked
        n_answer = len(loaded.tokenizer(answer, add_special_tokens=False)["input_ids"])
        return GenerationOutput(
            text=answer,
            prompt_tokens=checked[1],
            completion_tokens=n_answer,
            model_version=loaded.version,
        )

    def stream(self, item: GenerationInput) -> Generator[GenerationOutput, None, None]:
        """Pieces of the answer as outputs; the last one carries the token counts.

        Streams take the same one-call-at-a-time lock as batches (inside the generation
        thread, so a slow reader never holds it), and an error ends the stream with an
        error output instead of a hang."""
        try:
            loaded = self.current
        except ModelNotReady as exc:
            yield _failed(f"the model is not ready: {exc}", "model_not_ready", 503)
            return
        checked = check_input(loaded, item)
        if isinstance(checked, GenerationOutput):
            yield checked
            return
        prompt, n_prompt = checked
        request = _request(prompt, item)
        lookup, cached = cached_answer(self.cache, loaded, request)
        if cached is not None:  # the whole answer as one piece
            yield GenerationOutput(text=cached.text, model_version=loaded.version, cache=lookup)
            yield GenerationOutput(
                prompt_tokens=cached.prompt_tokens,
                completion_tokens=cached.completion_tokens,
                model_version=loaded.version,
                cache=lookup,
            )
            return
        pieces = loaded.engine.stream(request)
        try:
            while True:
                try:
                    piece = next(pieces)
                except StopIteration as end:  # the generator returns the tokens it generated
                    completion = int(end.value)
                    break
                yield GenerationOutput(text=piece, model_version=loaded.version, cache=lookup)
        except Exception as exc:
            log.warning("stream failed: %s", exc)
            yield _failed(str(exc), "generation_failed", 500)
            return
        finally:
            pieces.close()
        yield GenerationOutput(
            prompt_tokens=n_prompt,
            completion_tokens=completion,
            model_version=loaded.version,
            cache=lookup,
        )


class ModelNotReady(RuntimeError):
    """No model is loaded yet (still loading, or it could not be loaded)."""


def _prompt_text(loaded: LoadedModel, item: GenerationInput) -> str:
    if item.messages is not None:
        return render_chat(loaded.tokenizer, item.messages)
    return item.text or ""


def _request(prompt: str, item: GenerationInput) -> GenerationRequest:
    return GenerationRequest(
        prompt=prompt,
        max_new_tokens=item.max_new_tokens,
        temperature=item.temperature,
        top_p=item.top_p,
        stop=tuple(item.stop),
    )


def check_input(loaded: LoadedModel, item: GenerationInput) -> tuple[str, int] | GenerationOutput:
    """(prompt text, prompt tokens), or an error output naming the offending field."""
    param = "messages" if item.messages is not None else "prompt"
    try:
        prompt = _prompt_text(loaded, item)
    except Exception as exc:  # a template that rejects this conversation
        error = _failed(f"cannot apply the chat template: {exc}", "invalid_request_error")
        return error.model_copy(update={"error_param": param})
    n_tokens = len(loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if n_tokens + item.max_new_tokens > loaded.context_length:
        error = _failed(
            f"the prompt is {n_tokens} tokens; with max_new_tokens {item.max_new_tokens} it "
            f"exceeds the model's context of {loaded.context_length} tokens",
            "context_length_exceeded",
        )
        return error.model_copy(update={"error_param": param})
    return prompt, n_tokens


def cached_answer(
    cache: ResponseCache | None, loaded: LoadedModel, request: GenerationRequest
) -> tuple[Lookup, CachedAnswer | None]:
    """What the response cache holds for `request` on the loaded version ("off" when the
    cache is disabled or the request samples)."""
    if cache is None or not cacheable(request):
        return "off", None
    return cache.get(cache.key(loaded.version, loaded.engine.runtime, request))


def _output(
    loaded: LoadedModel, answer: Generation | CachedAnswer, lookup: Lookup
) -> GenerationOutput:
    return GenerationOutput(
        text=answer.text,
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens,
        confidence=answer.confidence,
        model_version=loaded.version,
        cache=lookup,
    )


def _outputs(loaded: LoadedModel, requests: list[GenerationRequest]) -> list[GenerationOutput]:
    return [_output(loaded, r, "off") for r in loaded.engine.generate(requests)]


def run_inputs(
    loaded: LoadedModel, inputs: list[GenerationInput], cache: ResponseCache | None = None
) -> list[GenerationOutput]:
    """Generate for every valid input in batched calls; invalid ones get an error output, and
    ones the response cache holds get its answer.

    If a batched call fails, its requests are retried one by one, so a request that breaks
    generation fails alone and the others in its batch still get their answers."""
    outputs: list[GenerationOutput | None] = [None] * len(inputs)
    valid: list[tuple[int, GenerationRequest]] = []
    lookups: dict[int, Lookup] = {}
    for i, item in enumerate(inputs):
        checked = check_input(loaded, item)
        if isinstance(checked, GenerationOutput):
            outputs[i] = checked
            continue
        request = _request(checked[0], item)
        lookups[i], cached = cached_answer(cache, loaded, request)
        if cached is not None:
            outputs[i] = _output(loaded, cached, "hit")
        else:
            valid.append((i, request))
    if not valid:
        return [o for o in outputs if o is not None]
    try:
        results = _outputs(loaded, [r for _, r in valid])
    except Exception as batch_error:
        log.warning("batched generation failed (%s); retrying its requests one by one", batch_error)
        results = []
        for _, request in valid:
            try:
                results.extend(_outputs(loaded, [request]))
            except Exception as exc:
                results.append(_failed(f"generation failed: {exc}", "generation_failed", 500))
    for (i, request), output in zip(valid, results, strict=True):
        outputs[i] = output.model_copy(update={"cache": lookups[i]})
        if cache is not None and lookups[i] == "miss" and output.error is None:
            answer = CachedAnswer(
                output.text, output.prompt_tokens, output.completion_tokens, output.confidence
            )
            cache.put(cache.key(loaded.version, loaded.engine.runtime, request), answer)
    return [o for o in outputs if o is not None]
