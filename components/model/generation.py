"""Loading a base model (plus adapter) for inference, and batched chat generation."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from components.model.chat import IGNORE_INDEX, load_tokenizer, render_chat, tokenize_for_training
from components.model.device import select_compute_dtype, select_device


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    # Geometric mean of the model's probabilities for the tokens it chose (before temperature
    # and top-p): low values mark answers the model was unsure of, which go to review.
    confidence: float | None = None


def load_for_inference(
    base_path: str, adapter_dir: str | None = None, device: str = "auto"
) -> tuple[Any, Any]:
    """Base model with the adapter merged in (faster decoding), and a left-padding tokenizer."""
    from transformers import AutoModelForCausalLM

    device = select_device(device)
    dtype = select_compute_dtype(device)
    # Left padding: decoder-only models continue from the right edge.
    tokenizer = load_tokenizer(adapter_dir or base_path, padding_side="left")
    model: Any = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    model.to(device).eval()
    return model, tokenizer


@dataclass(frozen=True)
class GenerationRequest:
    """One templated prompt and its own decoding settings."""

    prompt: str
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None  # a sampled request with a seed draws the same answer every time


# Below this temperature sampling is greedy decoding in all but name, and dividing the logits
# by a number this small overflows them to inf (then NaN probabilities): decode greedily.
MIN_SAMPLING_TEMPERATURE = 1e-3


def is_greedy(temperature: float, top_p: float) -> bool:
    """Whether these settings decode greedily: at temperature ~0, or when sampling would keep
    only the most likely token anyway (top_p 0). Greedy answers are deterministic."""
    return temperature < MIN_SAMPLING_TEMPERATURE or top_p <= 0


def sampling_args(temperature: float, top_p: float) -> dict[str, Any]:
    """`generate` keyword arguments for the decoding settings (greedy when `is_greedy`)."""
    if is_greedy(temperature, top_p):
        return {"do_sample": False}
    # remove_invalid_values: a guard that turns any inf/NaN logit into a finite one, so a
    # numerical edge never reaches the sampler as NaN probabilities.
    return {
        "do_sample": True,
        "temperature": temperature,
        "top_p": top_p,
        "remove_invalid_values": True,
    }


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def group_requests(
    requests: Sequence[GenerationRequest], max_ratio: float = 2.0
) -> list[list[int]]:
    """Indices grouped so one `generate` call serves each group.

    A group shares sampling settings, and its largest `max_new_tokens` is at most `max_ratio`
    times its smallest: a 16-token request never waits for a 256-token one in the same call.
    A sampled request with a seed is a group of its own, so its draws are its seed's alone.
    """
    order = sorted(
        range(len(requests)),
        key=lambda i: (requests[i].temperature, requests[i].top_p, requests[i].max_new_tokens),
    )
    groups: list[list[int]] = []
    for i in order:
        r = requests[i]
        if groups and not seeded(r):
            first = requests[groups[-1][0]]
            if (
                not seeded(first)
                and (first.temperature, first.top_p)
                == (
                    r.temperature,
                    r.top_p,
                )
                and r.max_new_tokens <= max_ratio * first.max_new_tokens
            ):
                groups[-1].append(i)
                continue
        groups.append([i])
    return groups


def seeded(request: GenerationRequest) -> bool:
    """Whether the request samples from its own seed."""
    return request.seed is not None and not is_greedy(request.temperature, request.top_p)


def seed_sampling(request: GenerationRequest) -> None:
    """Seed the sampler for this request alone (the caller holds the one-call-at-a-time lock)."""
    if seeded(request):
        import torch

        torch.manual_seed(int(request.seed or 0) % 2**63)


def _row_limits(tokenizer: Any, requests: Sequence[GenerationRequest], prompt_len: int) -> Any:
    """A stopping criterion that ends each row at its own token limit or stop string."""
    import torch
    from transformers import StoppingCriteria

    limits = [r.max_new_tokens for r in requests]

    class RowLimits(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            generated = input_ids.shape[1] - prompt_len
            done = torch.tensor([generated >= n for n in limits], device=input_ids.device)
            for row, request in enumerate(requests):
                if request.stop and not done[row]:
                    tail = tokenizer.decode(input_ids[row, prompt_len:][-16:])
                    done[row] = any(s in tail for s in request.stop)
            return done

    return RowLimits()


class TokenLogProbs:
    """Records the log-probability of every chosen token during `generate`, at O(batch) memory.

    `processor` keeps the step's log-softmax of the model's logits (transformers runs custom
    processors before the sampling warpers, so temperature and top-p do not change it); `criterion`
    (a stopping criterion that never stops) then picks the log-probability of the token just
    appended. Unlike `output_scores`, nothing of vocabulary size is kept across steps.
    """

    def __init__(self) -> None:
        from transformers import LogitsProcessor, StoppingCriteria

        self.steps: list[Any] = []
        self._last: Any = None
        outer = self

        class Keep(LogitsProcessor):
            def __call__(self, input_ids: Any, scores: Any) -> Any:
                outer._last = scores.float().log_softmax(dim=-1)
                return scores

        class Pick(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                import torch

                outer.steps.append(outer._last.gather(1, input_ids[:, -1:]).squeeze(1))
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        self.processor = Keep()
        self.criterion = Pick()

    def confidence(self, row: int, n_tokens: int) -> float | None:
        """The confidence of the row's first `n_tokens` generated tokens."""
        return confidence_of([float(step[row]) for step in self.steps[:n_tokens]])


def confidence_of(logprobs: Sequence[float]) -> float | None:
    """exp(mean log-probability) of the chosen tokens, non-finite ones left out."""
    import math

    finite = [v for v in logprobs if math.isfinite(v)]
    return math.exp(sum(finite) / len(finite)) if finite else None


def generate_requests(
    model: Any, tokenizer: Any, requests: Sequence[GenerationRequest]
) -> list[Generation]:
    """Serve many requests with as few batched `generate` calls as their settings allow."""
    results: dict[int, Generation] = {}
    for group in group_requests(requests):
        batch_requests = [requests[i] for i in group]
        results.update(zip(group, _generate_group(model, tokenizer, batch_requests), strict=True))
    return [results[i] for i in range(len(requests))]


def _generate_group(
    model: Any, tokenizer: Any, requests: Sequence[GenerationRequest]
) -> list[Generation]:
    from transformers import LogitsProcessorList, StoppingCriteriaList

    batch = tokenizer(
        [r.prompt for r in requests], return_tensors="pt", padding=True, add_special_tokens=False
    ).to(model.device)
    first = requests[0]
    sampling = sampling_args(first.temperature, first.top_p)
    prompt_len = batch["input_ids"].shape[1]
    logprobs = TokenLogProbs()
    seed_sampling(first)
    output = model.generate(
        **batch,
        max_new_tokens=max(r.max_new_tokens for r in requests),
        pad_token_id=tokenizer.pad_token_id,
        logits_processor=LogitsProcessorList([logprobs.processor]),
        stopping_criteria=StoppingCriteriaList(
            [_row_limits(tokenizer, requests, prompt_len), logprobs.criterion]
        ),
        **sampling,
    )
    results = []
    for index, (row, mask, request) in enumerate(
        zip(output[:, prompt_len:], batch["attention_mask"], requests, strict=True)
    ):
        ids = row.tolist()[: request.max_new_tokens]
        if tokenizer.eos_token_id in ids:  # everything after the end of turn is padding
            ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        results.append(
            Generation(
                text=truncate_at_stop(text, request.stop),
                prompt_tokens=int(mask.sum()),
                completion_tokens=len(ids),
                confidence=logprobs.confidence(index, len(ids)),
            )
        )
    return results


def generate_chat(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[list[dict[str, str]]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Sequence[str] = (),
) -> list[Generation]:
    """Generate one answer per conversation with the same settings for all."""
    return generate_requests(
        model,
        tokenizer,
        [
            GenerationRequest(
                prompt=render_chat(tokenizer, c),
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                stop=tuple(stop),
            )
            for c in conversations
        ],
    )


def stream_request(
    model: Any,
    tokenizer: Any,
    request: GenerationRequest,
    lock: AbstractContextManager[Any] | None = None,
) -> Generator[str, None, int]:
    """Yield the answer's text in pieces as it is generated (one request, no batching);
    returns the number of tokens generated.

    `generate` runs in a worker thread, under `lock` when given (one model call at a time).
    Generation stops as soon as the reader stops reading (a stop string, a closed stream), and
    an error in the worker is raised here instead of leaving the reader waiting for ever.
    """
    import threading

    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    batch = tokenizer([request.prompt], return_tensors="pt", add_special_tokens=False).to(
        model.device
    )
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    cancelled = threading.Event()
    failure: list[BaseException] = []
    prompt_len = batch["input_ids"].shape[1]
    generated = [0]

    class WhenCancelled(StoppingCriteria):
        """Counts the generated tokens; stops when the reader has gone."""

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            import torch

            generated[0] = input_ids.shape[1] - prompt_len
            return torch.full((input_ids.shape[0],), cancelled.is_set(), device=input_ids.device)

    limits = _row_limits(tokenizer, [request], prompt_len)

    def work() -> None:
        try:
            with lock or nullcontext():
                if not cancelled.is_set():
                    seed_sampling(request)
                    model.generate(
                        **batch,
                        max_new_tokens=request.max_new_tokens,
                        streamer=streamer,
                        pad_token_id=tokenizer.pad_token_id,
                        stopping_criteria=StoppingCriteriaList([limits, WhenCancelled()]),
                        **sampling_args(request.temperature, request.top_p),
                    )
        except BaseException as exc:
            failure.append(exc)
        finally:
            streamer.end()  # the reader's loop ends even when generate never started

    worker = threading.Thread(target=work, daemon=True, name="stream-generate")
    worker.start()
    emitted = ""
    try:
        for piece in streamer:
            candidate = emitted + piece
            text = truncate_at_stop(candidate, request.stop)
            if len(text) > len(emitted):
                yield text[len(emitted) :]
                emitted = text
            if len(text) < len(candidate):  # a stop string appeared: the answer ends here
                break
    finally:
        cancelled.set()
        worker.join()
    if failure:
        raise RuntimeError(f"generation failed: {failure[0]}") from failure[0]
    return generated[0]


def answer_log_likelihoods(
    model: Any, tokenizer: Any, examples: Sequence[Any], batch_size: int
) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, token count) of each reference answer, for perplexity."""
    import torch

    out: list[tuple[float, int]] = []
    for start in range(0, len(examples), batch_size):
        rows = [
            tokenize_for_training(tokenizer, e, max_len=4096)
            for e in examples[start : start + batch_size]
        ]
        width = max(len(r["input_ids"]) for r in rows)
        pad = tokenizer.pad_token_id

        def padded(key: str, fill: int, rows: list = rows, width: int = width) -> Any:
            return torch.tensor(
                [r[key] + [fill] * (width - len(r[key])) for r in rows], device=model.device
            )

        input_ids, attention, labels = (
            padded("input_ids", pad),
            padded("attention_mask", 0),
            padded("labels", IGNORE_INDEX),
        )
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)),
            shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view(shift_labels.shape)
        counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
        out.extend((float(n), int(c)) for n, c in zip(nll.sum(dim=1), counts, strict=True))
    return out
