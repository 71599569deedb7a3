"""The OpenVINO engine: SmolLM2 exported once (int8 weights), requests joining and leaving the
running batch, per-request limits and stops, streams from the same batch, a refused request
failing alone; and the service falling back to the reference when it cannot convert."""

import threading
import time
from pathlib import Path

import pytest

from components.model.generation import GenerationRequest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from components.config import EngineConfig, ModelConfig
    from components.model.base_model import resolve_base_model
    from components.model.chat import load_tokenizer
    from components.serving.convert import openvino_folder
    from components.serving.engine import OpenVINOEngine

    base = resolve_base_model(ModelConfig())
    folder = openvino_folder(tmp_path_factory.mktemp("openvino"), base.path, None, "int8")
    tokenizer = load_tokenizer(base.path, padding_side="left")
    engine = OpenVINOEngine(folder, tokenizer, EngineConfig(name="openvino"))
    yield engine, tokenizer
    engine.close()


def ask(tokenizer, question: str, max_new_tokens: int, stop: tuple = ()) -> GenerationRequest:
    from components.model.chat import render_chat

    prompt = render_chat(tokenizer, [{"role": "user", "content": question}])
    return GenerationRequest(prompt=prompt, max_new_tokens=max_new_tokens, stop=stop)


def test_the_converted_model_still_knows_its_answer(smollm2) -> None:
    engine, tokenizer = smollm2
    [answer] = engine.generate([ask(tokenizer, "What is the capital of France?", 16)])
    assert "Paris" in answer.text
    assert answer.confidence is not None and 0 < answer.confidence <= 1


def test_short_requests_join_a_running_long_one_and_leave_before_it(smollm2) -> None:
    engine, tokenizer = smollm2
    long_request = ask(tokenizer, "Write a long story about a lighthouse keeper.", 160)
    first_piece, long_done = threading.Event(), {}

    def read_long() -> None:
        pieces = engine.stream(long_request)
        try:
            while True:
                next(pieces)
                first_piece.set()
        except StopIteration as end:
            long_done.update(at=time.monotonic(), tokens=end.value)

    reader = threading.Thread(target=read_long)
    reader.start()
    assert first_piece.wait(60)
    short = [ask(tokenizer, "Say hi.", n) for n in (2, 5)] + [ask(tokenizer, "Count to 50.", 9)]
    answers = engine.generate(short)
    short_done = time.monotonic()
    assert not long_done  # the short ones were answered while the long one was still running
    reader.join(120)
    assert long_done["at"] > short_done
    assert [a.completion_tokens for a in answers][2] == 9  # each stops at its own limit
    assert all(a.completion_tokens <= n for a, n in zip(answers, (2, 5, 9), strict=True))
    assert 9 < long_done["tokens"] <= 160


def test_a_stop_string_ends_only_its_own_request(smollm2) -> None:
    engine, tokenizer = smollm2
    question = "List the days of the week, one per line."
    stopped, unstopped = engine.generate(
        [ask(tokenizer, question, 64, stop=("Wednesday",)), ask(tokenizer, question, 64)]
    )
    assert "Wednesday" in unstopped.text, unstopped.text
    assert "Wednesday" not in stopped.text and "Tuesday" in stopped.text, stopped.text
    assert stopped.completion_tokens < unstopped.completion_tokens


def test_a_stream_says_what_a_whole_answer_says(smollm2) -> None:
    """Asked alone, in the same state of the prefix cache, the streamed pieces join up into the
    whole answer. (Greedy text is only compared like this: which requests share a step changes
    the float sums, and a near tie between two tokens may then go either way, in any engine.)"""
    engine, tokenizer = smollm2
    asks = (("Name three colours.", ()), ("List the days of the week.", ("Friday",)))
    for question, stop in asks:
        request = ask(tokenizer, question, 32, stop=stop)
        engine.generate([request])  # caches the prompt's prefix for both asks below
        [whole] = engine.generate([request])
        pieces = list(engine.stream(request))
        assert len(pieces) > 3
        assert "".join(pieces).strip() == whole.text


def test_a_request_the_engine_refuses_fails_alone(smollm2) -> None:
    engine, tokenizer = smollm2
    fine = ask(tokenizer, "Say hi.", 4)
    refused = GenerationRequest(prompt=fine.prompt, max_new_tokens=0)
    outcomes: dict[int, str] = {}

    def send(i: int, request: GenerationRequest) -> None:
        try:
            outcomes[i] = f"{engine.generate([request])[0].completion_tokens} tokens"
        except RuntimeError as exc:
            outcomes[i] = f"refused: {exc}"

    threads = [
        threading.Thread(target=send, args=(i, refused if i % 2 else fine)) for i in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [outcomes[i] for i in (0, 2, 4)] == ["4 tokens"] * 3, outcomes
    assert all("max_new_tokens" in outcomes[i] for i in (1, 3, 5)), outcomes


def test_prefix_caching_gives_the_answers_computed_without_it(smollm2) -> None:
    """The shared prefix (the chat template's system turn) is computed once and reused: the
    answers, asked again once the prefix is cached, are those of an engine without the cache."""
    from components.config import EngineConfig
    from components.serving.engine import OpenVINOEngine

    engine, tokenizer = smollm2
    questions = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?"]
    uncached = OpenVINOEngine(
        Path(engine.model_dir), tokenizer, EngineConfig(name="openvino", prefix_caching=False)
    )
    try:
        reference = [uncached.generate([ask(tokenizer, q, 12)])[0].text for q in questions]
    finally:
        uncached.close()
    for _ in range(2):  # the second round starts from the prefixes the first one cached
        assert [engine.generate([ask(tokenizer, q, 12)])[0].text for q in questions] == reference


def test_a_closed_engine_finishes_what_it_runs_and_takes_nothing_new(smollm2) -> None:
    from components.config import EngineConfig
    from components.serving.engine import OpenVINOEngine

    engine, tokenizer = smollm2
    settings = EngineConfig(name="openvino", max_batched_tokens=512)
    other = OpenVINOEngine(Path(engine.model_dir), tokenizer, settings)
    answers: list = []
    worker = threading.Thread(
        target=lambda: answers.extend(other.generate([ask(tokenizer, "Say hi.", 8)]))
    )
    worker.start()
    time.sleep(0.2)
    other.close()
    worker.join(60)
    assert len(answers) == 1 and answers[0].completion_tokens > 0
    with pytest.raises(RuntimeError, match="closed"):
        other.generate([ask(tokenizer, "Say hi.", 8)])


def kill(thread: threading.Thread) -> None:
    """Raise SystemExit inside `thread`, as a crash nobody foresaw would end it."""
    import ctypes

    hit = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread.ident), ctypes.py_object(SystemExit)
    )
    assert hit == 1


def test_a_killed_scheduler_fails_what_it_held_and_all_after_at_once(smollm2) -> None:
    from components.config import EngineConfig
    from components.serving.engine import EngineStopped, OpenVINOEngine

    engine, tokenizer = smollm2
    other = OpenVINOEngine(Path(engine.model_dir), tokenizer, EngineConfig(name="openvino"))
    pieces = other.stream(ask(tokenizer, "Write a long story about a lighthouse keeper.", 300))
    next(pieces)  # it is running
    kill(other._thread)
    started = time.monotonic()
    with pytest.raises(EngineStopped, match="scheduler stopped: SystemExit"):
        for _ in pieces:
            pass
    with pytest.raises(EngineStopped, match="scheduler stopped"):
        other.generate([ask(tokenizer, "Say hi.", 4)])
    assert time.monotonic() - started < 10  # failed, not left waiting
    assert other.failure is not None and "SystemExit" in other.failure
    other.close()


def test_a_killed_engine_is_not_ready_fails_fast_and_is_loaded_again(
    champion_home, monkeypatch
) -> None:
    from components.config import load_profile
    from components.serving.loading import default_model_uri
    from components.serving.model import ServedModel
    from components.serving.protocol import GenerationInput

    monkeypatch.setenv("FLYWHEEL_HOME", str(champion_home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{champion_home / 'mlflow.db'}")
    monkeypatch.setenv("FLYWHEEL_PROFILE", "tiny")
    config = load_profile("tiny", ["serve.engine.name=openvino", "serve.engine.weights=fp32"])
    served = ServedModel.from_uri(default_model_uri(), warmup=False, config=config)
    stopped = served.loaded
    assert stopped is not None and stopped.engine.name == "openvino" and served.ready
    pieces = served.stream(GenerationInput(text="hi", max_new_tokens=400))
    assert next(pieces).error is None
    kill(stopped.engine._thread)
    *_, last = pieces
    assert last.error_code == "generation_failed" and "scheduler stopped" in (last.error or "")
    started = time.monotonic()
    assert not served.ready  # /readyz says 503 from here, and the version is loading again
    [refused] = served.generate([GenerationInput(text="hi", max_new_tokens=3)])
    assert refused.error_code == "model_not_ready" and "loading it again" in (refused.error or "")
    assert time.monotonic() - started < 2
    deadline = time.monotonic() + 120
    while not served.ready and time.monotonic() < deadline:
        time.sleep(0.2)
    assert served.ready and served.loaded is not stopped
    [answer] = served.generate([GenerationInput(text="hi", max_new_tokens=3)])
    assert answer.error is None and answer.completion_tokens == 3
    served.unload()


def test_without_an_exporter_the_service_serves_the_reference_and_says_why(
    champion_home, monkeypatch, tmp_path
) -> None:
    from components.config import load_profile
    from components.serving.loading import default_model_uri
    from components.serving.model import ServedModel
    from components.serving.protocol import GenerationInput

    monkeypatch.setenv("FLYWHEEL_HOME", str(champion_home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{champion_home / 'mlflow.db'}")
    monkeypatch.setenv("FLYWHEEL_PROFILE", "tiny")
    monkeypatch.setenv("FLYWHEEL_EXPORT_VENV", str(tmp_path / "missing"))
    config = load_profile("tiny", ["serve.engine.name=openvino"])
    served = ServedModel.from_uri(default_model_uri(), warmup=False, config=config)
    assert served.loaded.engine.name == "transformers"
    assert "make engine-setup" in (served.loaded.fallback or "")
    [out] = served.generate([GenerationInput(text="hi", max_new_tokens=3)])
    assert out.error is None and out.completion_tokens == 3


@pytest.mark.e2e
def test_the_service_serves_on_the_engine_over_http(champion_home, tmp_path) -> None:
    import concurrent.futures

    import httpx

    from components.inference.store import InferenceStore
    from tests.conftest import ServedService

    engine = "serve.engine.name=openvino serve.engine.weights=fp32"
    service = ServedService(
        champion_home, env={"BENTOML_HOME": str(tmp_path / "bentoml"), "FLYWHEEL_SET": engine}
    )
    try:
        service.wait_ready(240)  # the first start converts the version
        url = service.url

        def call(n: int) -> httpx.Response:
            body = {"prompt": f"question {n}", "max_new_tokens": n}
            return httpx.post(f"{url}/generate", json=body, timeout=120)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(call, [3, 5, 8, 13, 21, 3, 5, 8]))
        assert [r.status_code for r in responses] == [200] * 8
        # Each request left the batch at its own limit (the tiny model never says end-of-turn).
        assert [r.json()["completion_tokens"] for r in responses] == [3, 5, 8, 13, 21, 3, 5, 8]
        assert {r.headers["x-model-version"] for r in responses} == {"1"}
        stream = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=stream, timeout=60) as r:
            events = [line for line in r.iter_lines() if line]
        assert r.status_code == 200 and events[-1] == "data: [DONE]"
        log = service.log_path.read_text()
        assert "serving it on transformers" not in log
        assert (champion_home / "serving" / "flywheel-llm-tiny" / "1" / "openvino-fp32").is_dir()
    finally:
        assert service.stop() == 0
    with InferenceStore(f"sqlite:///{champion_home / 'feedback.db'}") as store:
        for response in responses:
            assert store.get(response.json()["request_id"]) is not None


class Garbling:
    """A conversion gone wrong (as bfloat16 goes on this CPU): the engine answers garbage."""

    name = "openvino"

    def __init__(self, engine) -> None:
        self.engine = engine

    def generate(self, requests):
        from dataclasses import replace

        return [replace(g, text=g.text[::-1]) for g in self.engine.generate(requests)]


@pytest.fixture(scope="module")
def frozen_profile():
    from components.config import load_profile

    return load_profile("cpu-small", ["eval.max_examples=16", "eval.max_new_tokens=32"])


def test_the_quality_check_passes_the_engine_and_refuses_a_broken_conversion(
    smollm2, frozen_profile, home
) -> None:
    from components.config import ModelConfig
    from components.model.base_model import resolve_base_model
    from components.serving.quality import check_engine

    engine, tokenizer = smollm2
    base = resolve_base_model(ModelConfig()).path
    good = check_engine(engine, tokenizer, base, None, frozen_profile)
    broken = check_engine(Garbling(engine), tokenizer, base, None, frozen_profile)
    assert good.examples == broken.examples == 16
    assert good.reference_low <= good.reference_rouge_l <= good.reference_high
    assert good.passed, good.summary()
    assert not broken.passed, broken.summary()
    assert "below the float32 reference" in broken.summary()


def test_a_refused_conversion_is_served_on_the_reference_and_recorded(
    champion_home, monkeypatch
) -> None:
    from components.config import load_profile
    from components.registry.tracking import mlflow_client
    from components.serving import loading, quality
    from components.serving.loading import default_model_uri
    from components.serving.model import ServedModel

    monkeypatch.setenv("FLYWHEEL_HOME", str(champion_home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{champion_home / 'mlflow.db'}")
    monkeypatch.setenv("FLYWHEEL_PROFILE", "tiny")
    verdict = quality.EngineQuality("openvino", 16, 0.05, 0.30, 0.25, 0.35, 0.95)
    monkeypatch.setattr(loading, "check_engine", lambda *args: verdict)
    # int8 weights: a folder not yet checked in this home
    config = load_profile("tiny", ["serve.engine.name=openvino", "serve.engine.weights=int8"])
    served = ServedModel.from_uri(default_model_uri(), warmup=False, config=config)
    assert served.loaded.engine.name == "transformers"
    assert "below the float32 reference" in served.loaded.fallback
    tags = mlflow_client().get_model_version("flywheel-llm-tiny", "1").tags
    assert tags["serving.engine"] == "transformers"
    assert "below the float32 reference" in tags["serving.fallback"]
