"""Monitor checks and decisions on recorded `/metrics` scrapes and replayed traffic.

The `.prom` fixtures were recorded from a real `bentoml serve` of the cpu-small champion by
`tests/fixtures/monitor/record_metrics.py`: a baseline scrape, two windows of 32 requests of
16 new tokens (stable), one of 32 requests of 128 new tokens (slow), and a restarted service.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from components.config import MonitorConfig
from components.inference.records import Answer
from components.monitor.decision import Signals, assess, next_state
from components.monitor.scrape import Scrape, histogram_quantile, parse_metrics, service_window
from components.monitor.state import MonitorState
from components.records import read_jsonl

FIXTURES = Path(__file__).parent / "fixtures" / "monitor"
REPO = Path(__file__).resolve().parents[1]
CONFIG = MonitorConfig(min_requests=20, min_feedback=20, min_prompts=20, cooldown_minutes=120)


def scrapes() -> dict[str, Scrape]:
    times = json.loads((FIXTURES / "scrape_times.json").read_text())
    return {n: parse_metrics((FIXTURES / f"{n}.prom").read_text(), t) for n, t in times.items()}


def support_prompts() -> list[str]:
    return [r["instruction"] for r in read_jsonl(REPO / "data/seed/support.jsonl")]


def reference_and_live() -> tuple[list[str], list[str]]:
    """Training prompts, and unseen prompts from the same distribution (a stable replay)."""
    prompts = support_prompts()
    random.Random(7).shuffle(prompts)
    return prompts[60:], prompts[:60]


def drift_prompts() -> list[str]:
    return [r["prompt"] for r in read_jsonl(REPO / "data/seed/drift_prompts.jsonl")]


def answers(
    prompts: list[str], down_share: float, start: float, version: str = "1", seed: int = 0
) -> list[Answer]:
    """Replayed generations of `version`, a `down_share` of them rated down, the rest up."""
    rng = random.Random(seed)
    rows = []
    for i, prompt in enumerate(prompts):
        down = rng.random() < down_share
        rows.append(
            Answer(
                request_id=f"r{seed}-{i}",
                created_at=start + i,
                model_version=version,
                endpoint="generate",
                prompt=prompt,
                response="an answer",
                prompt_tokens=10,
                completion_tokens=16,
                latency_ms=500.0,
                rating="down" if down else "up",
                correction="a better answer" if down and i % 2 else None,
                rated_at=start + i + 1,
            )
        )
    return rows


def run(
    state: MonitorState,
    scrape: Scrape | None,
    live: list[Answer],
    before: list[Answer],
    reference: list[str],
    running: str | None = None,
):
    now = scrape.taken_at if scrape else 2e9
    signals = Signals(now, scrape, None, live, live, before, reference)
    decision = assess(signals, state, CONFIG, retrain_running=running)
    return decision, next_state(state, signals, decision, CONFIG)


@pytest.fixture
def warmed() -> tuple[MonitorState, dict[str, Scrape], list[str], list[Answer]]:
    """State after a first, healthy window: the latency baseline and rating history are set."""
    s = scrapes()
    reference, live = reference_and_live()
    first = answers(live[:40], 0.1, s["baseline"].taken_at, seed=1)
    state = MonitorState(last_scrape=s["baseline"].to_dict(), last_run_at=s["baseline"].taken_at)
    decision, state = run(state, s["stable_1"], first, [], reference)
    assert not decision.retrain, decision.markdown()
    assert state.latency_baselines["1"] == pytest.approx(decision.service.p95_s)
    return state, s, reference, first


def triggered(decision) -> list[str]:
    return [c.name for c in decision.reasons]


def test_parse_recorded_scrape_counts_only_user_requests():
    s = scrapes()
    window = service_window(s["baseline"], s["stable_1"])
    assert window.requests == 32 and window.server_errors == 0
    assert window.model_version == "1" and not window.restarted
    assert 0 < window.p50_s <= window.p95_s <= window.p99_s
    assert window.tokens_per_s == pytest.approx(32 * 16 / window.seconds, rel=0.01)
    assert window.mean_batch_size >= 1


def test_counter_reset_after_restart_counts_from_zero():
    s = scrapes()
    window = service_window(s["slow"], s["restarted"])
    assert window.restarted
    assert window.requests == 8  # not 8 - 97 (negative) and not silently dropped


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = ((1.0, 50.0), (2.0, 100.0), (float("inf"), 100.0))
    assert histogram_quantile(0.5, buckets) == pytest.approx(1.0)
    assert histogram_quantile(0.75, buckets) == pytest.approx(1.5)
    assert histogram_quantile(0.99, ((1.0, 0.0), (float("inf"), 10.0))) == 1.0
    assert histogram_quantile(0.5, ((1.0, 0.0), (float("inf"), 0.0))) is None


def test_no_retrain_on_a_stable_replay(warmed):
    state, s, reference, first = warmed
    _, live = reference_and_live()
    window = answers(live[20:], 0.1, s["stable_1"].taken_at, seed=2)
    decision, _ = run(state, s["stable_2"], window, first, reference)
    assert not decision.retrain, decision.markdown()
    assert triggered(decision) == []
    assert decision.drift is not None and decision.drift.domain_auc < CONFIG.max_domain_auc
    assert decision.feedback.rated == 40 and decision.feedback.baseline_rated == 40


def test_retrain_on_a_latency_regression(warmed):
    state, s, reference, first = warmed
    _, live = reference_and_live()
    window = answers(live[20:], 0.1, s["stable_2"].taken_at, seed=3)
    decision, after = run(state, s["slow"], window, first, reference)
    assert decision.retrain, decision.markdown()
    assert triggered(decision) == ["p95 latency regression"]
    assert decision.service.p95_s > 2 * state.latency_baselines["1"]
    assert after.last_retrain_at == s["slow"].taken_at


def test_retrain_on_a_thumbs_down_spike(warmed):
    state, s, reference, first = warmed
    _, live = reference_and_live()
    window = answers(live[20:], 0.6, s["stable_1"].taken_at, seed=4)
    decision, _ = run(state, s["stable_2"], window, first, reference)
    assert decision.retrain, decision.markdown()
    assert triggered(decision) == ["thumbs-down rate"]
    assert decision.feedback.p_value < CONFIG.significance
    assert decision.feedback.corrections > 0


def test_a_few_thumbs_down_are_not_a_spike(warmed):
    state, s, reference, first = warmed
    _, live = reference_and_live()
    window = answers(live[20:30], 0.9, s["stable_1"].taken_at, seed=5)  # 10 ratings < 20
    decision, _ = run(state, s["stable_2"], window, first, reference)
    assert "thumbs-down rate" not in triggered(decision)


def test_retrain_on_prompt_drift(warmed):
    state, s, reference, first = warmed
    window = answers(drift_prompts()[:40], 0.1, s["stable_1"].taken_at, seed=6)
    decision, _ = run(state, s["stable_2"], window, first, reference)
    assert decision.retrain, decision.markdown()
    assert "prompt text drift (AUC)" in triggered(decision)
    assert decision.drift.domain_auc > 0.95
    assert set(decision.drift.live_terms) & {"bake", "pack", "secret", "long"}


def test_cooldown_holds_back_a_second_retrain(warmed):
    state, s, reference, first = warmed
    window = answers(drift_prompts()[:40], 0.1, s["stable_1"].taken_at, seed=6)
    recent = MonitorState(**{**state.__dict__, "last_retrain_at": s["stable_2"].taken_at - 600})
    decision, after = run(recent, s["stable_2"], window, first, reference)
    assert not decision.retrain and decision.reasons  # the signal is there, the retrain is not
    assert decision.blocked_by.startswith("cooldown")
    assert after.last_retrain_at == recent.last_retrain_at

    expired = MonitorState(**{**state.__dict__, "last_retrain_at": s["stable_2"].taken_at - 7300})
    decision, started = run(expired, s["stable_2"], window, first, reference)
    assert decision.retrain and started.last_retrain_at == s["stable_2"].taken_at
    # A run that only reports (`--retrain off`) starts no cooldown for the next one.
    signals = Signals(s["stable_2"].taken_at, s["stable_2"], None, window, window, first, reference)
    looked = next_state(expired, signals, decision, CONFIG, acting=False)
    assert looked.last_retrain_at == expired.last_retrain_at


def test_a_running_retrain_blocks_another(warmed):
    state, s, reference, first = warmed
    window = answers(drift_prompts()[:40], 0.1, s["stable_1"].taken_at, seed=6)
    running = "training-pipeline run 'brave-fox' is RUNNING"
    decision, _ = run(state, s["stable_2"], window, first, reference, running=running)
    assert not decision.retrain and decision.blocked_by == running


def test_unreachable_service_is_reported_not_a_crash():
    reference, live = reference_and_live()
    signals = Signals(2e9, None, "connection refused", answers(live[:5], 0, 1e9), [], [], reference)
    decision = assess(signals, MonitorState(), CONFIG)
    assert not decision.retrain
    assert (
        decision.checks[0].name == "service" and "connection refused" in decision.checks[0].detail
    )
    drift = [c for c in decision.checks if c.name.startswith("prompt")]
    assert drift and all("not judged" in c.detail for c in drift)  # 5 prompts < min_prompts


def test_state_survives_a_round_trip(tmp_path):
    s = scrapes()
    state = MonitorState(1.0, s["slow"].to_dict(), 2.0, {"1": 9.5})
    state.save(tmp_path / "m.json")
    loaded = MonitorState.load(tmp_path / "m.json")
    assert loaded == state
    assert Scrape.from_dict(loaded.last_scrape) == s["slow"]


def test_monitor_curates_user_corrections_before_a_retrain(home) -> None:
    """The monitor flow's curation step as a plain function (`.fn`), on a real store."""
    from components.config import load_profile
    from components.inference.records import InferenceRecord
    from components.inference.store import InferenceStore
    from flows.monitor import curate_feedback

    with InferenceStore() as store:
        for rid, prompt in (("a", "How do I reset the worker?"), ("b", "Which port is MLflow on?")):
            store.log(InferenceRecord(rid, 1e9, "1", "generate", prompt, "no idea", 3, 2, 5.0))
        store.add_feedback("a", "down", correction="Restart it with make worker.")
        store.add_feedback("b", "down")  # no correction: nothing to learn from
    reviewed_only = curate_feedback.fn(load_profile("tiny"), since=0.0)
    assert reviewed_only["new"] == 0 and reviewed_only["total"] == 0  # they wait for review
    assert reviewed_only["policy"] == {"admitted": {}, "refused": {"reviewed_only": 1}}
    trusting = load_profile("tiny", ["memory.trust=feedback"])
    first = curate_feedback.fn(trusting, since=0.0)
    assert first == {
        "new": 1,
        "skipped": {},
        "policy": {"admitted": {"agreement": 1}, "refused": {}},
        "total": 1,
        "folder": str(home / "curated"),
    }
    assert json.loads((home / "curated" / "policy.json").read_text()) == first["policy"]
    [version] = (home / "curated").glob("0001-*.jsonl")
    assert json.loads(version.read_text())["rule"] == "agreement"
    again = curate_feedback.fn(trusting, since=0.0)
    assert again["new"] == 0 and again["skipped"] == {"duplicate": 1} and again["total"] == 1


@pytest.mark.parametrize(("waiting", "retrain"), [(12, True), (3, False), (None, False)])
def test_corrections_waiting_in_the_memory_call_for_a_retrain(waiting, retrain) -> None:
    reference, live = reference_and_live()
    calm = answers(live[:5], 0, 1e9)
    signals = Signals(2e9, None, None, calm, [], [], reference, "1", memory_waiting=waiting)
    decision = assess(signals, MonitorState(), CONFIG)
    check = next(c for c in decision.checks if c.name == "corrections waiting in the memory")
    assert (decision.retrain, check.triggered, check.value) == (retrain, retrain, waiting)
    if retrain:
        assert "corrections waiting in the memory 12" in decision.summary
