"""The runtimes that generate for the service: the transformers reference, and OpenVINO GenAI's
continuous-batching engine.

Both take `GenerationRequest`s (templated prompt and its own settings) and give `Generation`s,
whole (`generate`) or as text pieces (`stream`, whose return value is the generated token
count). The transformers engine runs one batched `generate` call at a time; the OpenVINO
engine runs one scheduler loop in its own thread, and a request joins the running batch at
the next step and leaves it when its own limit or stop string is reached. If that thread ever
stops, the engine says why (`failure`), every request it held or is given fails at once with
`EngineStopped`, and the served model restarts it (`components/serving/model.py`).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from components.config import EngineConfig
from components.model.generation import (
    Generation,
    GenerationRequest,
    confidence_of,
    generate_requests,
    is_greedy,
    stream_request,
    truncate_at_stop,
)

log = logging.getLogger("flywheel.engine")


class EngineStopped(RuntimeError):
    """The engine cannot generate any more (its scheduler thread stopped)."""


class Engine(Protocol):
    name: str
    runtime: str  # what makes the answers (engine and weights): part of the cache key
    memory_bytes: int  # what it holds: weights, and the KV cache it reserves
    failure: str | None  # why it cannot generate any more; None while it can

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]: ...

    def stream(self, request: GenerationRequest) -> Generator[str, None, int]: ...

    def close(self) -> None: ...


class TransformersEngine:
    """The reference: transformers `generate`, static batches, one model call at a time
    (concurrent calls on a CPU fight over the same cores and are slower together)."""

    name = "transformers"
    # It runs in its callers' threads: it has no thread of its own that could stop.
    failure: str | None = None

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.runtime = f"transformers-{str(model.dtype).removeprefix('torch.')}"
        self.memory_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.compute = threading.Lock()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        with self.compute:
            return generate_requests(self.model, self.tokenizer, requests)

    def stream(self, request: GenerationRequest) -> Generator[str, None, int]:
        return stream_request(self.model, self.tokenizer, request, self.compute)

    def close(self) -> None:
        """Nothing to stop: the model is freed with the last reference to it."""


@dataclass
class _Job:
    """One request in the OpenVINO scheduler: token ids arrive on `updates`, `None` ends it."""

    request: GenerationRequest
    updates: queue.Queue[list[tuple[int, float]] | BaseException | None] = field(
        default_factory=queue.Queue
    )
    cancelled: threading.Event = field(default_factory=threading.Event)


class OpenVINOEngine:
    """OpenVINO GenAI's `ContinuousBatchingPipeline` (paged KV cache, iteration-level batching).

    One thread owns the pipeline: it adds the requests that arrived, runs a `step()`, and hands
    each request the tokens that step made. A request that cannot be added fails alone; a step
    that fails ends the requests it was running with that error, and the loop goes on.
    """

    name = "openvino"

    def __init__(self, model_dir: Path, tokenizer: Any, settings: EngineConfig) -> None:
        import openvino_genai as ov_genai

        scheduler = ov_genai.SchedulerConfig()
        scheduler.cache_size = max(1, math.ceil(settings.kv_cache_gb))
        scheduler.max_num_batched_tokens = settings.max_batched_tokens
        scheduler.dynamic_split_fuse = True
        # Every chat prompt opens with the same templated system turn (and a conversation
        # repeats its earlier turns): their KV blocks are computed once and shared.
        scheduler.enable_prefix_caching = settings.prefix_caching
        # float32 compute and an int8 KV cache: bfloat16 (the default on CPUs that have it)
        # garbles this model's answers.
        properties = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "u8"}
        self.pipe = ov_genai.ContinuousBatchingPipeline(
            str(model_dir), scheduler, "CPU", properties
        )
        self.model_dir, self.tokenizer = model_dir, tokenizer
        self.runtime = model_dir.name  # openvino-<weights>
        weights = sum(f.stat().st_size for f in model_dir.glob("*.bin"))
        self.memory_bytes = weights + scheduler.cache_size * 2**30
        self._ov = ov_genai
        self._arrivals: queue.Queue[_Job | None] = queue.Queue()
        self._next_id = 0
        self._closing = threading.Lock()
        self._closed = False
        self.failure: str | None = None
        self._thread = threading.Thread(target=self._run, name="openvino-engine", daemon=True)
        self._thread.start()

    # -- the scheduler thread -------------------------------------------------------------

    def _config(self, request: GenerationRequest) -> Any:
        config = self._ov.GenerationConfig()
        config.max_new_tokens = request.max_new_tokens
        config.logprobs = 1  # the chosen token's log-probability, for the answer's confidence
        if not is_greedy(request.temperature, request.top_p):
            config.do_sample = True
            config.temperature = request.temperature
            config.top_p = request.top_p
            if request.seed is not None:  # this request's sampler starts from its seed
                config.rng_seed = request.seed % 2**63
        if request.stop:
            config.stop_strings = set(request.stop)
            config.include_stop_str_in_output = False
        return config

    def _add(self, job: _Job, running: dict[int, tuple[_Job, Any]]) -> None:
        try:
            handle = self.pipe.add_request(
                self._next_id, job.request.prompt, self._config(job.request)
            )
        except Exception as exc:  # this request alone is refused
            job.updates.put(exc)
            return
        running[self._next_id] = (job, handle)
        self._next_id += 1

    def _arrived(self, wait: bool) -> list[_Job | None]:
        """What was submitted since the last step; waits for the first when `wait`."""
        arrived = [self._arrivals.get()] if wait else []
        while True:
            try:
                arrived.append(self._arrivals.get_nowait())
            except queue.Empty:
                return arrived

    def _run(self) -> None:
        """The scheduler loop; if it ever ends by an error, fail what it held and all that
        comes after, instead of leaving callers waiting."""
        running: dict[int, tuple[_Job, Any]] = {}
        try:
            self._loop(running)
        except BaseException as exc:  # whatever it was, the thread ends here
            why = f"the engine's scheduler stopped: {type(exc).__name__}: {exc}"
            log.error("%s", why, exc_info=exc)
            self._stopped(why, running)

    def _stopped(self, why: str, running: dict[int, tuple[_Job, Any]]) -> None:
        with self._closing:  # nothing is submitted from now on
            self.failure, self._closed = why, True
        error = EngineStopped(why)
        for job, _ in running.values():
            job.updates.put(error)
        while True:
            try:
                waiting = self._arrivals.get_nowait()
            except queue.Empty:
                return
            if waiting is not None:
                waiting.updates.put(error)

    def _loop(self, running: dict[int, tuple[_Job, Any]]) -> None:
        closing = False
        while True:
            for job in self._arrived(wait=not running and not closing):
                if job is None:  # close(): nothing is submitted after it
                    closing = True
                else:
                    self._add(job, running)
            if not running:
                if closing:
                    return
                continue
            try:
                self.pipe.step()
            except Exception as exc:
                log.warning("engine step failed: %s", exc)
                for job, handle in running.values():
                    job.updates.put(RuntimeError(f"generation failed: {exc}"))
                    handle.drop()
                running.clear()
                continue
            self._collect(running)

    def _collect(self, running: dict[int, tuple[_Job, Any]]) -> None:
        still_running = self._ov.GenerationStatus.RUNNING
        for request_id, (job, handle) in list(running.items()):
            tokens: list[tuple[int, float]] = []
            while handle.can_read():
                for output in handle.read().values():
                    tokens += zip(output.generated_ids, output.generated_log_probs, strict=False)
            if tokens:
                job.updates.put(tokens)
            if job.cancelled.is_set():
                handle.drop()
            elif handle.get_status() == still_running:
                continue
            job.updates.put(None)
            del running[request_id]

    # -- callers' side --------------------------------------------------------------------

    def _submit(self, request: GenerationRequest) -> _Job:
        job = _Job(request)
        with self._closing:
            if self.failure is not None:
                raise EngineStopped(self.failure)
            if self._closed:
                raise RuntimeError("the engine was closed (the model was swapped)")
            self._arrivals.put(job)
        return job

    def _tokens(self, job: _Job) -> Generator[list[tuple[int, float]], None, None]:
        while True:
            try:
                update = job.updates.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():  # gone without a word: never wait for it
                    raise EngineStopped(self.failure or "the engine's scheduler is gone") from None
                continue
            if update is None:
                return
            if isinstance(update, BaseException):
                raise update
            yield update

    def _generation(self, job: _Job) -> Generation:
        ids: list[int] = []
        logprobs: list[float] = []
        for tokens in self._tokens(job):
            ids += [t for t, _ in tokens]
            logprobs += [p for _, p in tokens]
        text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return Generation(
            text=truncate_at_stop(text, job.request.stop),
            prompt_tokens=len(
                self.tokenizer(job.request.prompt, add_special_tokens=False)["input_ids"]
            ),
            completion_tokens=len(ids),
            confidence=confidence_of(logprobs),
        )

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """All `requests` join the running batch at once; each is answered when it is done."""
        jobs = [self._submit(r) for r in requests]
        results: list[Generation] = []
        failure: BaseException | None = None
        for job in jobs:  # wait for every job, even after one failed: none is left running
            try:
                results.append(self._generation(job))
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
        return results

    def stream(self, request: GenerationRequest) -> Generator[str, None, int]:
        """The answer's text as it is made; stops the request when the reader stops reading."""
        job = self._submit(request)
        ids: list[int] = []
        emitted = ""
        try:
            for tokens in self._tokens(job):
                ids += [t for t, _ in tokens]
                decoded = self.tokenizer.decode(ids, skip_special_tokens=True)
                if decoded.endswith("\ufffd"):  # half of a multi-byte character: wait
                    continue
                text = truncate_at_stop(decoded, request.stop)
                if len(text) > len(emitted):
                    yield text[len(emitted) :]
                    emitted = text
                if len(text) < len(decoded):
                    break
        finally:
            job.cancelled.set()
        return len(ids)

    def close(self) -> None:
        """Take no new requests; the loop ends once the submitted ones have finished."""
        with self._closing:
            self._closed = True
            self._arrivals.put(None)
