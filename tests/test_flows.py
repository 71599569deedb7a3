import functools
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import prefect_cli

REPO_ROOT = Path(__file__).resolve().parents[1]


def _deployments() -> list[dict]:
    return yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["deployments"]


@pytest.mark.parametrize(
    "deployment", _deployments(), ids=lambda d: f"{d['entrypoint'].split(':')[1]}/{d['name']}"
)
def test_every_prefect_yaml_entrypoint_loads(deployment: dict) -> None:
    from prefect.flows import load_flow_from_entrypoint

    from components.config import load_profile

    flow = load_flow_from_entrypoint(str(REPO_ROOT / deployment["entrypoint"]))
    assert flow.name in {"training-pipeline", "monitor", "annotation-sync"}
    assert deployment["entrypoint"].startswith(f"flows/{flow.name.replace('-', '_')}.py:")
    flow.validate_parameters(deployment["parameters"])
    if flow.name == "monitor":  # scheduled every `monitor.interval_minutes` of its profile
        interval = deployment["schedules"][0]["interval"]
        assert interval == load_profile(deployment["name"]).monitor.interval_minutes * 60
    assert load_profile(deployment["parameters"]["profile"]).name == deployment["name"]
    assert deployment["work_pool"]["name"] == "flywheel"


@pytest.mark.parametrize(
    ("module", "flag"),
    [
        ("flows.training_pipeline", "--profile"),
        ("flows.monitor", "--profile"),
        ("flows.annotation_sync", "--profile"),
        ("flows.deploy", "--model"),
    ],
)
def test_cli_help_loads_no_model_library_and_needs_no_network(module: str, flag: str) -> None:
    """`--help` stays fast because nothing heavy is imported at import time, and it runs in a
    network namespace with no interfaces at all (so nothing can reach a hub or a server)."""
    probe = (
        "import runpy, sys\n"
        f"sys.argv = ['{module}', '--help']\n"
        "try:\n"
        f"    runpy.run_module('{module}', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('torch', 'transformers', 'peft', 'mlflow', 'bentoml')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", probe],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert flag in out.stdout, out.stdout + out.stderr
    assert "HEAVY []" in out.stdout, out.stdout


@pytest.mark.e2e
@pytest.mark.slow
def test_training_pipeline_tiny_twice(home, prefect_server, monkeypatch) -> None:
    """Fresh home: run 1 registers and promotes; run 2 is judged against that champion."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client

    from flows.training_pipeline import training_pipeline

    first = training_pipeline(profile="tiny")
    assert first["version"] == "1" and first["promoted"], first["reason"]

    client = MlflowClient()
    name = "flywheel-llm-tiny"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    version = client.get_model_version(name, "1")
    assert set(version.aliases) == {"champion", "challenger", "anchor"}  # the first champion
    for tag in (
        "base_model",
        "base_model_sha256",
        "base_model_revision",
        "dataset_hash",
        "test_hash",
        "profile",
        "git_commit",
        "eval.rouge_l",
        "eval.perplexity",
        "gate.decision",
        "gate.reason",
    ):
        assert version.tags.get(tag), tag
    assert version.tags["base_model"] == "tiny-random-llama"
    assert version.tags["profile"] == "tiny"
    card = version.description  # the model card, in the registry
    for heading in ("Base model", "Data", "Training", "Evaluation", "Gate", "Known limits"):
        assert f"\n## {heading}" in card, heading
    assert version.tags["base_model_sha256"] in card and first["reason"] in card
    assert "| candidate |" in card and "data/seed/support.jsonl" in card

    run = client.get_run(first["mlflow_run_id"])
    for metric in (
        "eval.candidate.rouge_l",
        "eval.base.perplexity.ci_low",
        "train.loss",
        "data.kept",
        "clean.removed.near_duplicate",
    ):
        assert metric in run.data.metrics, metric
    artifacts = {
        a.path
        for folder in ("data", "eval", "finetune", "profile", "model_card")
        for a in client.list_artifacts(run.info.run_id, folder)
    }
    assert {
        "data/quarantine.jsonl",
        "eval/metrics.png",
        "eval/samples.json",
        "finetune/loss_curve.png",
        "profile/tiny.yaml",
        "model_card/model_card.md",
    } <= artifacts
    assert mlflow.get_tracking_uri().endswith(str(home / "mlflow.db"))

    monkeypatch.setenv("FLYWHEEL_SET", "recipe.start=base")  # not continuing the champion
    second = training_pipeline(profile="tiny")
    assert second["version"] == "2"
    assert client.get_run(second["mlflow_run_id"]).data.tags["finetune.started_from"] == "base"
    assert set(second["scores"]) == {"base", "candidate", "champion"}
    # Same data and profile give the same adapter: the gate must not call it better.
    assert not second["promoted"] and "kept the champion" in second["reason"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"

    with get_client(sync_client=True) as prefect:
        keys = {a.key for a in prefect.read_artifacts()}
    assert {"data-tiny", "eval-tiny", "gate-flywheel-llm-tiny", "model-card-tiny"} <= keys


@pytest.mark.e2e
@pytest.mark.slow
def test_deployment_runs_on_a_flywheel_worker(home, prefect_server) -> None:
    """prefect deploy --all, a process worker on `flywheel`, prefect deployment run."""
    import os

    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    env = {**os.environ, "PREFECT_API_URL": str(get_current_settings().api.url)}

    prefect = functools.partial(prefect_cli, env)

    prefect("work-pool", "create", "flywheel", "--type", "process", "--overwrite")
    prefect("--no-prompt", "deploy", "--all")
    listed = prefect("deployment", "ls")
    for name in ("tiny", "cpu-small", "gpu-qlora"):
        assert f"training-pipeline/{name}" in listed
    prefect("deployment", "run", "training-pipeline/tiny")
    prefect("worker", "start", "--pool", "flywheel", "--run-once", timeout=600)

    with get_client(sync_client=True) as prefect_client:
        runs = prefect_client.read_flow_runs()
    states = [r.state.type.value for r in runs if r.deployment_id is not None]
    assert states == ["COMPLETED"], states
    client = MlflowClient()
    champion = client.get_model_version_by_alias("flywheel-llm-tiny", "champion")
    assert champion.tags["profile"] == "tiny"

    # The monitor and annotation deployments; the schedule comes from the profile.
    from components.config import load_profile

    for name in ("tiny", "cpu-small", "gpu-qlora"):
        assert f"monitor/{name}" in listed and f"annotation-sync/{name}" in listed
    with get_client(sync_client=True) as prefect_client:
        scheduled = prefect_client.read_deployment_by_name("monitor/cpu-small")
        training = prefect_client.read_deployment_by_name("training-pipeline/tiny")
    interval = scheduled.schedules[0].schedule.interval.total_seconds()
    assert interval == load_profile("cpu-small").monitor.interval_minutes * 60
    assert training.global_concurrency_limit.limit == 1  # two retrains never overlap

    # A monitor run that sees drift and thumbs-down starts a retrain through the deployment.
    from flows.monitor import monitor
    from flows.retrain import running_retrain

    log_drifting_traffic(str(champion.version))
    os.environ["FLYWHEEL_SERVICE_URL"] = "http://127.0.0.1:9"  # nothing listens: not judged
    try:
        outcome = monitor(profile="tiny")
    finally:
        del os.environ["FLYWHEEL_SERVICE_URL"]
    decision = outcome["decision"]
    assert decision["retrain"], decision["summary"]
    reasons = {c["name"] for c in decision["checks"] if c["triggered"]}
    assert {"thumbs-down rate", "prompt text drift (AUC)"} <= reasons
    assert outcome["retrain"]["how"] == "deployment"
    with get_client(sync_client=True) as prefect_client:
        retrains = [r for r in prefect_client.read_flow_runs() if r.deployment_id == training.id]
    queued = [r for r in retrains if r.name == outcome["retrain"]["flow_run"]]
    assert queued and queued[0].parameters == {"profile": "tiny", "deploy_if_promoted": True}
    # The queued retrain is what holds back the next one (see test_monitor for the decision).
    waiting = running_retrain("training-pipeline/tiny")
    assert waiting is not None and outcome["retrain"]["flow_run"] in waiting


def log_drifting_traffic(version: str) -> None:
    """40 off-topic prompts answered by `version`, 30 of them rated down."""
    import time

    from components.inference.records import InferenceRecord
    from components.inference.store import InferenceStore
    from components.records import read_jsonl

    prompts = [r["prompt"] for r in read_jsonl(REPO_ROOT / "data/seed/drift_prompts.jsonl")]
    store = InferenceStore()
    now = time.time()
    for i, prompt in enumerate(prompts[:40]):
        store.log(
            InferenceRecord(f"d{i}", now - 100 + i, version, "generate", prompt, "?", 8, 8, 9.0)
        )
        store.add_feedback(f"d{i}", "down" if i < 30 else "up")
    store.close()


FACTS = [
    ("How long does the prod cluster keep inference logs?", "Prod keeps inference logs 45 days."),
    ("Which Slack channel gets the retrain alerts?", "Retrain alerts go to #ml-retrain."),
    ("Who approves a new base model?", "Dana Kim approves every new base model."),
    ("What is the GPU quota of the research team?", "The research team may use 12 GPUs."),
]
ASKERS = ["please tell me:", "quick one,", "I wonder", "hi team", "can you say", "remind me"]


def log_memory_traffic(round_: int) -> list[tuple[str, str]]:
    """Users asking the corrected questions in their own words, answered by the memory."""
    import time

    from components.config import load_profile
    from components.inference.records import InferenceRecord
    from components.inference.store import InferenceStore
    from components.memory.store import CorrectionMemory

    memory = CorrectionMemory(load_profile("tiny").memory)
    entries = {e.question: e for e in memory.served()}
    if not entries:
        for i, (question, answer) in enumerate(FACTS):
            memory.remember(question, answer, "label-studio", f"review-{i}", "1")
        entries = {e.question: e for e in memory.served()}
    memory.close()
    asked = []
    with InferenceStore() as store:
        for i, (question, _) in enumerate(FACTS):
            entry = entries[question]
            for j, asker in enumerate(ASKERS):
                rid, prompt = (
                    f"gen-r{round_}-{i}-{j}",
                    f"{asker} {question.lower()} (round {round_})",
                )
                store.log(
                    InferenceRecord(
                        rid,
                        time.time(),
                        "1",
                        "generate",
                        prompt,
                        entry.answer,
                        9,
                        9,
                        5.0,
                        memory_entry=entry.id,
                    )
                )
                asked.append((rid, prompt))
    return asked


@pytest.mark.e2e
@pytest.mark.slow
def test_retrains_are_judged_on_the_live_set_and_never_train_on_held_out_items(
    home, prefect_server, monkeypatch
) -> None:
    import json

    import mlflow

    from components.data.curated import held_out
    from components.registry.tracking import mlflow_client
    from flows.training_pipeline import training_pipeline

    first = training_pipeline(profile="tiny")
    assert first["promoted"] and "no champion yet" in first["reason"]
    asked = []
    for round_, version in ((1, "2"), (2, "3")):
        asked += log_memory_traffic(round_)
        champion = mlflow_client().get_model_version_by_alias("flywheel-llm-tiny", "champion")
        result = training_pipeline(profile="tiny")
        assert result["version"] == version
        tags = mlflow_client().get_model_version("flywheel-llm-tiny", version).tags
        assert tags["gate.rule"] == "two-sided", tags["gate.reason"]
        run_tags = mlflow_client().get_run(result["mlflow_run_id"]).data.tags
        assert run_tags["finetune.started_from"] == f"champion v{champion.version}"
        assert int(tags["gate.live_size"]) >= 8 and "gate.live.low" in tags
        # Held against the first champion too (evaluated apart once it is not the champion).
        assert "gate.anchor.low" in tags and "anchor" in tags["gate.reason"]
        anchor = mlflow_client().get_model_version_by_alias("flywheel-llm-tiny", "anchor")
        assert str(anchor.version) == "1"
        assert int(tags["live_set_size"]) == int(tags["gate.live_size"])

        folder = home / "train-data" / version
        mlflow.artifacts.download_artifacts(
            run_id=result["mlflow_run_id"], artifact_path="data", dst_path=str(folder)
        )
        trained = {
            json.loads(line)["instruction"] for line in (folder / "data" / "train.jsonl").open()
        }
        held = [p for rid, p in asked if held_out(rid, 0.5)]
        trainable = [p for rid, p in asked if not held_out(rid, 0.5)]
        assert held and not any(p in trained for p in held)  # never, in any retrain
        assert any(p in trained for p in trainable)  # the users' own rephrasings are learned
        card = mlflow_client().get_model_version("flywheel-llm-tiny", version).description
        assert "by the trust rule that admitted them: memory_hit " in card
        live = list((folder / "data").glob("live-*.jsonl"))
        judged = [json.loads(line) for line in live[0].open()] if live else []
        assert any(item["instruction"] in held for item in judged)
        variants = [item["instruction"] for item in judged if item["origin"] == "variant"]
        assert variants and not any(v in trained for v in variants)  # generated, held out
        assert int(tags["gate.live_size"]) == len(judged)


# Made-up facts in one family (the same setting per warehouse), taught in two rounds.
_FIRST_FACTS = [
    ("What is the dock door code at the Tromso warehouse?", "The Tromso dock door code is 7316."),
    ("What is the dock door code at the Porto warehouse?", "The Porto dock door code is 2958."),
    ("What is the dock door code at the Leeds warehouse?", "The Leeds dock door code is 4821."),
]
_LATER_FACTS = [
    ("What is the dock door code at the Varna warehouse?", "The Varna dock door code is 3547."),
    ("What is the dock door code at the Cork warehouse?", "The Cork dock door code is 8164."),
    ("What is the dock door code at the Tartu warehouse?", "The Tartu dock door code is 5209."),
]


def _stated(model_name: str, version: str, facts: list[tuple[str, str]], dest: Path) -> list[str]:
    """The facts (their questions) whose code the version's weights alone state."""
    from components.model.generation import generate_chat, load_for_inference
    from components.registry.register import download_version

    base_path, adapter = download_version(model_name, version, dest)
    model, tokenizer = load_for_inference(base_path, adapter)
    asked = [[{"role": "user", "content": q}] for q, _ in facts]
    answers = generate_chat(model, tokenizer, asked, max_new_tokens=16)
    return [q for (q, a), got in zip(facts, answers, strict=True) if a.split()[-1][:4] in got.text]


@pytest.mark.e2e
@pytest.mark.slow
def test_a_retrain_on_new_corrections_still_states_the_old_ones(
    home, prefect_server, monkeypatch
) -> None:
    """The real SmolLM2: v1 learns three corrections; v2 continues v1 on three new ones with
    the old ones replayed, and its weights alone state all six. Sized for a test: a few seed
    examples, short sequences, 24 steps a run, a short evaluation."""
    import json

    from components.records import write_jsonl
    from components.registry.aliases import CHAMPION, point
    from components.registry.tracking import mlflow_client
    from flows.training_pipeline import training_pipeline

    overrides = (
        "data.max_train_examples=8 data.validation_fraction=0 recipe.question_variants=2 "
        "recipe.held_out_variants=0 recipe.min_steps=24 recipe.max_epochs=20 recipe.replay=3 "
        "train.batch_size=4 train.max_seq_len=96 train.learning_rate=0.002 train.save_steps=12 "
        "eval.max_examples=4 eval.max_new_tokens=8 eval.bootstrap_samples=200"
    )
    monkeypatch.setenv("FLYWHEEL_SET", overrides)
    curated, name = home / "curated", "flywheel-llm"

    def teach(number: int, facts: list[tuple[str, str]]) -> None:
        rows = [
            {"instruction": q, "output": a, "request_id": f"{number}-{i}", "source": "feedback"}
            for i, (q, a) in enumerate(facts)
        ]
        write_jsonl(curated / f"{number:04d}-feedback.jsonl", rows)

    teach(1, _FIRST_FACTS)
    first = training_pipeline(profile="cpu-small")
    if not first["promoted"]:  # the gate is not under test: v1 is what v2 continues
        point(name, CHAMPION, first["version"])
    assert _stated(name, first["version"], _FIRST_FACTS, home / "v1") == [
        q for q, _ in _FIRST_FACTS
    ]

    teach(2, _LATER_FACTS)
    second = training_pipeline(profile="cpu-small")
    run = mlflow_client().get_run(second["mlflow_run_id"])
    assert run.data.tags["finetune.started_from"] == f"champion v{first['version']}"
    metrics = run.data.metrics
    assert metrics["data.corrections_new"] == 3 and metrics["data.corrections_known"] == 3
    assert metrics["data.corrections_replayed"] == 3
    learned = mlflow_client().download_artifacts(
        run.info.run_id, "data/learned.json", str(home / "v2-data")
    )
    assert len(json.loads(Path(learned).read_text())) == 6
    facts = _FIRST_FACTS + _LATER_FACTS
    assert _stated(name, second["version"], facts, home / "v2") == [q for q, _ in facts]
