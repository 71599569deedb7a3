"""The served model: one loaded version at a time, swapped without a pause, answering batches,
streams and fixed answers' token counts; failures are outputs that say their kind.

Kept free of BentoML so it can be tested in-process; service/ wraps it in BentoML APIs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Generator

from components.config import PipelineConfig
from components.model.chat import render_chat
from components.model.generation import Generation, GenerationRequest
from components.serving.cache import CachedAnswer, Lookup, ResponseCache, cacheable
from components.serving.loading import (
    LoadedModel,
    ModelNotFound,
    load_model_version,
    resolve_model_uri,
    serving_profile,
)
from components.serving.protocol import GenerationInput, GenerationOutput, failed

log = logging.getLogger("flywheel.generator")


class ServedModel:
    """One served model; `swap` loads and warms the next one before switching to it. Until a
    model is in, `ready` is False and every call answers `model_not_ready`, so the service can
    say so at once instead of hanging. If its engine stops (`Engine.failure`), the same holds
    until the version is loaded again, which starts at once, in the background."""

    def __init__(
        self,
        warmup: bool = True,
        config: PipelineConfig | None = None,
        cache: ResponseCache | None = None,
    ) -> None:
        self.warmup = warmup
        self.config = config or serving_profile()
        self._current: LoadedModel | None = None
        self._uri: str | None = None  # where the current model was loaded from
        self._restarting = threading.Lock()
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
        return not isinstance(self._serving(), GenerationOutput)

    @property
    def loaded(self) -> LoadedModel | None:
        """The model serving now, if any."""
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
        self._uri, self.error = uri, None
        if previous is not None:
            previous.engine.close()  # once the requests it is running have finished
        return loaded

    def unload(self) -> None:
        """Stop serving: calls answer `model_not_ready`; those in flight finish."""
        previous, self._current = self._current, None
        self.error = "unloaded"
        if previous is not None:
            previous.engine.close()

    def _serving(self) -> LoadedModel | GenerationOutput:
        """The model serving now, or the `model_not_ready` output that says why none is."""
        current = self._current
        if current is None:
            reason = self.error or "the model is still loading"
            return failed(f"the model is not ready: {reason}", "model_not_ready")
        if current.engine.failure is not None:
            self._restart(current)
            reason = f"{current.engine.failure}; loading it again"
            return failed(f"the model is not ready: {reason}", "model_not_ready")
        return current

    def _restart(self, stopped: LoadedModel) -> None:
        """Load the stopped model's version again, once, in the background."""
        uri = self._uri
        if uri is None or not self._restarting.acquire(blocking=False):
            return

        def reload() -> None:
            try:
                if self._current is stopped:  # not swapped meanwhile
                    log.warning("restarting %s v%s: %s", stopped.name, stopped.version, uri)
                    self.load(uri)
            finally:
                self._restarting.release()

        threading.Thread(target=reload, name="engine-restart", daemon=True).start()

    def generate(self, inputs: list[GenerationInput]) -> list[GenerationOutput]:
        loaded = self._serving()
        if isinstance(loaded, GenerationOutput):
            return [loaded] * len(inputs)
        return run_inputs(loaded, inputs, self.cache)

    def count_tokens(self, item: GenerationInput, answer: str) -> GenerationOutput:
        """`answer` (given by the correction memory) as an output with this model's token counts."""
        loaded = self._serving()
        if isinstance(loaded, GenerationOutput):
            return loaded
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
        loaded = self._serving()
        if isinstance(loaded, GenerationOutput):
            yield loaded
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
            yield failed(str(exc), "generation_failed")
            return
        finally:
            pieces.close()
        yield GenerationOutput(
            prompt_tokens=n_prompt,
            completion_tokens=completion,
            model_version=loaded.version,
            cache=lookup,
        )


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
        seed=item.seed,
    )


def check_input(loaded: LoadedModel, item: GenerationInput) -> tuple[str, int] | GenerationOutput:
    """(prompt text, prompt tokens), or an error output naming the offending field."""
    param = "messages" if item.messages is not None else "prompt"
    try:
        prompt = _prompt_text(loaded, item)
    except Exception as exc:  # a template that rejects this conversation
        return failed(f"cannot apply the chat template: {exc}", "invalid_request_error", param)
    n_tokens = len(loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if n_tokens + item.max_new_tokens > loaded.context_length:
        return failed(
            f"the prompt is {n_tokens} tokens; with max_new_tokens {item.max_new_tokens} it "
            f"exceeds the model's context of {loaded.context_length} tokens",
            "context_length_exceeded",
            param,
        )
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
                results.append(failed(f"generation failed: {exc}", "generation_failed"))
    for (i, request), output in zip(valid, results, strict=True):
        outputs[i] = output.model_copy(update={"cache": lookups[i]})
        if cache is not None and lookups[i] == "miss" and output.error is None:
            answer = CachedAnswer(
                output.text, output.prompt_tokens, output.completion_tokens, output.confidence
            )
            cache.put(cache.key(loaded.version, loaded.engine.runtime, request), answer)
    return [o for o in outputs if o is not None]
