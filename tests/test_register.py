from dataclasses import replace
from pathlib import Path

import pytest

from components.evaluate.evaluation import Comparison
from components.registry.aliases import CHALLENGER, CHAMPION, current_champion
from components.registry.register import (
    LiveEvidence,
    decide_promotion,
    download_version,
    register_candidate,
)
from components.registry.tracking import RunLogger

BETTER = Comparison(
    metric="rouge_l",
    reference="base",
    candidate_value=0.40,
    reference_value=0.20,
    difference=0.20,
    low=0.12,
    high=0.28,
    confidence=0.95,
)
WORSE = replace(
    BETTER, reference="champion", candidate_value=0.18, difference=-0.02, low=-0.06, high=0.01
)
TAGS = {"profile": "tiny", "dataset_hash": "abc", "git_commit": "deadbeef"}


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_base, tiny_config) -> str:
    from components.records import Example, save_examples
    from components.train.finetune import finetune

    folder = tmp_path_factory.mktemp("adapter")
    save_examples(
        folder / "train.jsonl", [Example(instruction=f"q{i}", output=f"a{i}") for i in range(8)]
    )
    config = tiny_config.model_copy(
        update={"train": tiny_config.train.model_copy(update={"max_steps": 2})}
    )
    return finetune(config, tiny_base, str(folder / "train.jsonl"), None, folder / "ft").adapter_dir


def test_gate_decisions_explain_themselves() -> None:
    promote = decide_promotion(BETTER)
    assert promote.promote and "rouge_l" in promote.reason and "+0.1200" in promote.reason
    keep = decide_promotion(WORSE)
    assert not keep.promote and "kept the champion" in keep.reason

    perplexity = replace(BETTER, metric="perplexity", difference=-5.0, low=-8.0, high=-2.0)
    assert decide_promotion(perplexity).promote  # lower is better for perplexity


FROZEN_SAME = replace(BETTER, reference="champion", difference=-0.005, low=-0.015, high=0.005)
FROZEN_WORSE = replace(BETTER, reference="champion", difference=-0.05, low=-0.08, high=-0.02)
LIVE_BETTER = replace(BETTER, reference="champion", difference=0.30, low=0.20, high=0.40)
LIVE_SAME = replace(BETTER, reference="champion", difference=0.01, low=-0.05, high=0.07)


def live(comparison, size: int = 24) -> LiveEvidence:
    return LiveEvidence(comparison, size=size, min_size=8, margin=0.02)


def test_the_two_sided_gate_needs_both_sides() -> None:
    promoted = decide_promotion(FROZEN_SAME, live(LIVE_BETTER))
    assert promoted.promote and promoted.rule == "two-sided"
    assert (
        "live set (24 items)" in promoted.reason
        and "not worse beyond the margin" in promoted.reason
    )
    # Better on what users corrected, but worse on the frozen split beyond the margin: no.
    forgot = decide_promotion(FROZEN_WORSE, live(LIVE_BETTER))
    assert (
        not forgot.promote and forgot.rule == "two-sided" and "worse beyond 0.02" in forgot.reason
    )
    # The reverse: safe on the frozen split (even clearly better there), not better on live.
    unlearned = decide_promotion(replace(FROZEN_SAME, low=0.01, high=0.05), live(LIVE_SAME))
    assert not unlearned.promote and "not better" in unlearned.reason


def test_a_first_model_or_a_small_live_set_falls_back_to_the_frozen_rule() -> None:
    first = decide_promotion(BETTER, live(replace(LIVE_SAME, reference="base")))
    assert first.promote and first.rule == "frozen" and "no champion yet" in first.reason
    small = decide_promotion(FROZEN_SAME, live(LIVE_BETTER, size=3))
    assert not small.promote and small.rule == "frozen" and "3 items, fewer than 8" in small.reason
    assert decide_promotion(FROZEN_SAME).rule == "frozen"


def test_five_promotions_in_a_row_cannot_end_more_than_the_margin_below_the_anchor() -> None:
    """Each candidate is 0.015 worse than its champion on the frozen split, inside the margin
    of 0.02 at every step: against the champion alone each is promoted and the fifth ends 0.075
    below the first; held against the anchor too, the drift stops within the margin."""

    def versus(candidate: float, reference: float, name: str) -> Comparison:
        d = candidate - reference
        return replace(
            BETTER,
            reference=name,
            candidate_value=candidate,
            reference_value=reference,
            difference=d,
            low=d - 0.004,
            high=d + 0.004,
        )

    def run(anchored: bool) -> list[float]:
        anchor_score = champion_score = 0.30
        champions = [champion_score]
        for _ in range(5):
            candidate = champion_score - 0.015
            anchor = versus(candidate, anchor_score, "anchor") if anchored else None
            frozen = versus(candidate, champion_score, "champion")
            gate = decide_promotion(frozen, live(LIVE_BETTER), anchor)
            if gate.promote:
                champion_score = candidate
                champions.append(champion_score)
        return champions

    drifting = run(anchored=False)
    assert len(drifting) == 6 and drifting[-1] == pytest.approx(0.225)  # five steps down
    held = run(anchored=True)
    assert held[-1] >= 0.30 - 0.02 and len(held) == 2  # one step, then the anchor says no
    refused = decide_promotion(
        FROZEN_SAME, live(LIVE_BETTER), replace(FROZEN_WORSE, reference="anchor")
    )
    assert not refused.promote and "anchor" in refused.reason


def test_register_promote_then_refuse_a_worse_model(home, adapter_dir, tiny_base) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    name = "flywheel-llm-test"
    run1 = RunLogger.start("flywheel-test", "first", TAGS)
    first = register_candidate(run1.run_id, name, adapter_dir, tiny_base, TAGS, BETTER)
    assert first.version == "1" and first.aliases == [CHALLENGER, CHAMPION]
    assert first.previous_champion is None

    run2 = RunLogger.start("flywheel-test", "second", TAGS)
    second = register_candidate(run2.run_id, name, adapter_dir, tiny_base, TAGS, WORSE)
    assert second.version == "2" and second.aliases == [CHALLENGER]
    assert not second.gate.promote and second.previous_champion == "1"

    client = MlflowClient()
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == "2"
    v2 = client.get_model_version(name, "2")
    assert v2.tags["gate.decision"] == "rejected"
    assert v2.tags["dataset_hash"] == "abc" and v2.tags["git_commit"] == "deadbeef"
    assert str(current_champion(name).version) == "1"
    assert mlflow.get_tracking_uri() == f"sqlite:///{home / 'mlflow.db'}"

    base_path, adapter = download_version(name, "1", home / "dl")
    assert base_path == tiny_base.path
    assert (Path(adapter) / "adapter_config.json").is_file()
    assert (Path(adapter) / "tokenizer_config.json").is_file()  # chat template travels along


def test_a_version_carries_only_the_code_it_needs_to_load(home, adapter_dir, tiny_base) -> None:
    import mlflow

    from components.registry.register import MODEL_CODE

    run = RunLogger.start("flywheel-test", "code", TAGS)
    result = register_candidate(run.run_id, "flywheel-code", adapter_dir, tiny_base, TAGS, BETTER)
    local = Path(mlflow.artifacts.download_artifacts(result.model_uri, dst_path=str(home / "m")))
    package = local / "code" / "components"
    assert sorted(p.name for p in package.iterdir() if p.name != "__pycache__") == sorted(
        MODEL_CODE
    )
    shipped = {p.relative_to(package).as_posix() for p in package.rglob("*.py")}
    assert "model/generation.py" in shipped
    assert not any(name.startswith(("serving/", "monitor/", "data/")) for name in shipped)


def test_no_mlflow_call_writes_into_the_working_folder(home, tmp_path, monkeypatch) -> None:
    from components.registry.aliases import current_champion
    from components.serving.loading import ModelNotFound, resolve_model_uri

    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the default: SQLite under FLYWHEEL_HOME
    RunLogger.start("flywheel-test", "cwd", TAGS).finish()
    assert current_champion("nothing-here") is None
    with pytest.raises(ModelNotFound, match="run make train first"):
        resolve_model_uri("models:/nothing-here@champion")
    assert list(work.iterdir()) == []
    assert (home / "mlflow.db").is_file()


def test_registered_version_loads_as_pyfunc(home, adapter_dir, tiny_base) -> None:
    import mlflow.pyfunc
    import pandas as pd

    run = RunLogger.start("flywheel-test", "pyfunc", TAGS)
    register_candidate(run.run_id, "flywheel-llm-pyfunc", adapter_dir, tiny_base, TAGS, BETTER)
    model = mlflow.pyfunc.load_model(f"models:/flywheel-llm-pyfunc@{CHAMPION}")
    answers = model.predict(
        pd.DataFrame({"prompt": ["What is make test?", "Hi"]}), params={"max_new_tokens": 4}
    )
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_download_refuses_a_changed_base_model(home, adapter_dir, tiny_base) -> None:
    tampered = replace(tiny_base, sha256="0" * 64)
    run = RunLogger.start("flywheel-test", "tampered", TAGS)
    register_candidate(run.run_id, "flywheel-llm-tamper", adapter_dir, tampered, TAGS, BETTER)
    with pytest.raises(RuntimeError, match="trained on base weights 000000000000"):
        download_version("flywheel-llm-tamper", "1", home / "dl")
