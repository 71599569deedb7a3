"""`make demo PROFILE=tiny`: the whole loop through a real `bentoml serve`, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, files_outside_home, free_port, sqlite_uri


@pytest.mark.e2e
@pytest.mark.slow
def test_make_demo_runs_the_whole_loop_on_tiny(tmp_path: Path, tiny_base) -> None:
    import httpx
    from mlflow.tracking import MlflowClient

    home, port = tmp_path / "home", free_port()
    outcome_path = tmp_path / "outcome.json"
    env = {
        **os.environ,
        "FLYWHEEL_HOME": str(home),
        "PREFECT_HOME": str(home / "prefect"),
        "BENTOML_HOME": str(home / "bentoml"),
    }
    for name in (
        "PREFECT_API_URL",
        "MLFLOW_TRACKING_URI",
        "LABEL_STUDIO_URL",
        "FLYWHEEL_CURATED_DIR",
        "MPLCONFIGDIR",
        "HF_HOME",
    ):
        env.pop(name, None)
    before = files_outside_home(home)
    done = subprocess.run(
        [
            "make",
            "demo",
            "PROFILE=tiny",
            f"DEMO_ARGS=--port {port} --requests 30 --json {outcome_path}",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    outcome = json.loads(outcome_path.read_text())

    # Shifted traffic: retrain, for the reasons it shows.
    # (The random tiny model answers nothing, so its in-domain users rate it all down and the
    # first look may already call for a retrain: it only reports; step 7 acts.)
    second = outcome["second_decision"]
    assert second["retrain"], second["summary"]
    reasons = {c["name"] for c in second["checks"] if c["triggered"]}
    assert "corrections waiting in the memory" in reasons
    assert "decision: RETRAIN" in output and "Where to look" in output

    # The users' corrections answered the next askers from the memory at once; the model
    # alone still missed (the tiny model knows none of the team's facts).
    shifted = outcome["shifted_down_rate"]["v1 (before)"]
    assert shifted["memory_hits"] > 0 and shifted["memory"] < shifted["alone"]
    assert "thumbs-down on the shifted traffic" in output

    # The retrain ran with the users' corrections and was judged by the gate.
    assert outcome["curated"]["new"] > 0
    summary = outcome["retrain"]["summary"]
    assert outcome["retrain"]["how"] == "in-process" and summary["version"] == "2"
    client = MlflowClient(sqlite_uri(home))
    run = client.get_run(summary["mlflow_run_id"])
    # It trained on every curated example: the corrections and the trainable live rephrasings.
    curated = sum(len(p.read_text().splitlines()) for p in (home / "curated").glob("0*.jsonl"))
    assert curated > outcome["curated"]["total"] > 0
    assert run.data.metrics["data.from_feedback"] == curated
    champion = str(client.get_model_version_by_alias("flywheel-llm-tiny", "champion").version)
    assert champion == ("2" if summary["promoted"] else "1")
    assert outcome["serving_version"] == champion  # swapped in only if promoted
    assert f"v{champion} (after)" in outcome["shifted_down_rate"]

    # The demo stopped the service it started.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    assert not (home / "service.pid").exists()

    # Everything the demo wrote is under its home (the shared model cache was there before),
    # and `make clean` removes it all.
    assert (home / "curated").is_dir()  # the users' corrections are state, not repo data
    assert files_outside_home(home) - before == set()
    subprocess.run(["make", "clean"], cwd=REPO_ROOT, env=env, check=True, timeout=60)
    assert not home.exists()
    assert files_outside_home(home) - before == set()
