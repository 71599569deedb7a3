"""The team setup for real on one machine: a PostgreSQL server behind a Prefect server, an
MLflow tracking server with proxied artifacts, and the inference log; two Prefect workers on
the `flywheel` pool run `training-pipeline/tiny` twice, and the retrains never overlap."""

import functools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from components.process import Server
from tests.conftest import REPO_ROOT, free_port, prefect_cli

PG_BIN = Path("/usr/lib/postgresql/15/bin")
USER = "flywheel"


def as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: there, run it as the `postgres` system user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


class Postgres:
    def __init__(self, folder: Path) -> None:
        if not (PG_BIN / "postgres").is_file():  # a failure, not a skip
            pytest.fail("PostgreSQL 15 is missing: `make ops-tools` installs it (Debian)")
        self.folder, self.port = folder, free_port()
        self.data = folder / "data"
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres")
        self.run([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", USER, "--auth=trust"])
        options = f"-k {folder} -h 127.0.0.1 -p {self.port}"
        pg_ctl = [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options]
        self.run([*pg_ctl, "-l", str(folder / "postgres.log"), "-w", "-t", "60", "start"])

    def run(self, command: list[str]) -> None:
        done = subprocess.run(as_postgres(command), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr

    def create_database(self, name: str) -> str:
        self.run(
            [str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, name]
        )
        return f"{USER}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self.run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    # not under the tests' home: its folders are private to root, and PostgreSQL runs as
    # the `postgres` user
    folder = Path(tempfile.mkdtemp(prefix="flywheel-postgres-"))
    server = Postgres(folder)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_inference_log_on_postgres_loses_no_concurrent_write(postgres) -> None:
    from components.inference.records import InferenceRecord
    from components.inference.store import InferenceStore

    url = "postgresql+psycopg2://" + postgres.create_database("inference")
    writers, each = 8, 25
    stores = [InferenceStore(url) for _ in range(writers)]  # as several replicas would

    def write(k: int) -> None:
        for i in range(each):
            stores[k].log(
                InferenceRecord(f"r{k}-{i}", time.time(), "1", "/generate", "q", "a", 1, 1, 1.0)
            )
        assert stores[k].flush(60)
        for i in range(0, each, 5):  # feedback on one in five, while the others still write
            stores[k].add_feedback(f"r{k}-{i}", "down", correction=f"fix {k} {i}")

    threads = [threading.Thread(target=write, args=(k,)) for k in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    from sqlalchemy import text

    reader = InferenceStore(url)
    with reader.engine.connect() as conn:
        logged = conn.execute(text("select count(*) from inference")).scalar_one()
        rated = conn.execute(text("select count(*) from feedback")).scalar_one()
        fix = conn.execute(text("select correction from feedback where request_id = 'r7-20'"))
        assert fix.scalar_one() == "fix 7 20"
    assert (logged, rated) == (writers * each, writers * each // 5)
    assert reader.get("r7-24") is not None
    for store in [*stores, reader]:
        store.close()


@pytest.mark.e2e
@pytest.mark.slow
def test_training_through_workers_on_a_postgres_prefect_and_mlflow_server(
    postgres, home, tmp_path
) -> None:
    prefect_port, mlflow_port = free_port(), free_port()
    prefect_url, mlflow_url = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
    base_env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": f"{prefect_url}/api",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "MLFLOW_TRACKING_URI": mlflow_url,
        "FLYWHEEL_FEEDBACK_DB": "postgresql+psycopg2://" + postgres.create_database("flywheel"),
    }
    server_env = {
        **base_env,
        "PREFECT_API_DATABASE_CONNECTION_URL": "postgresql+asyncpg://"
        + postgres.create_database("prefect"),
    }
    servers = [
        Server.start(
            "prefect server",
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(prefect_port),
            ],
            f"{prefect_url}/api/health",
            tmp_path / "prefect-server.log",
            server_env,
        ),
        Server.start(
            "mlflow server",
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(mlflow_port),
                "--backend-store-uri",
                "postgresql+psycopg2://" + postgres.create_database("mlflow"),
                "--artifacts-destination",
                str(tmp_path / "artifacts"),
                "--serve-artifacts",
            ],
            f"{mlflow_url}/health",
            tmp_path / "mlflow-server.log",
            base_env,
        ),
    ]
    prefect = functools.partial(prefect_cli, base_env, timeout=180)
    workers: list[subprocess.Popen] = []
    try:
        for server in servers:
            server.wait_ready(180)
        prefect("work-pool", "create", "flywheel", "--type", "process")
        prefect("--no-prompt", "deploy", "--name", "training-pipeline/tiny")
        for k in range(2):
            with (tmp_path / f"worker-{k}.log").open("w") as log:
                workers.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "prefect",
                            "worker",
                            "start",
                            "--pool",
                            "flywheel",
                            "--name",
                            f"worker-{k}",
                        ],
                        cwd=REPO_ROOT,
                        env=base_env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        for _ in range(2):
            prefect("deployment", "run", "training-pipeline/tiny")

        api = httpx.Client(base_url=f"{prefect_url}/api", timeout=30)
        deadline, runs = time.monotonic() + 900, []
        while time.monotonic() < deadline:
            runs = api.post("/flow_runs/filter", json={}).json()
            runs = [r for r in runs if r["deployment_id"]]
            if len(runs) == 2 and all(
                r["state_type"] in ("COMPLETED", "FAILED", "CRASHED") for r in runs
            ):
                break
            time.sleep(3)
        assert [r["state_type"] for r in runs] == ["COMPLETED", "COMPLETED"], (
            runs,
            (tmp_path / "worker-0.log").read_text()[-3000:],
        )
        first, second = sorted(runs, key=lambda r: r["start_time"])
        assert first["end_time"] <= second["start_time"]  # the concurrency limit held

        # the registry, through the tracking server's REST API
        mlflow = httpx.Client(base_url=f"{mlflow_url}/api/2.0/mlflow", timeout=30)
        champion = mlflow.get(
            "/registered-models/alias", params={"name": "flywheel-llm-tiny", "alias": "champion"}
        ).json()["model_version"]
        versions = mlflow.get(
            "/model-versions/search", params={"filter": "name='flywheel-llm-tiny'"}
        ).json()["model_versions"]
        assert sorted(int(v["version"]) for v in versions) == [1, 2]
        tags = {t["key"]: t["value"] for t in champion["tags"]}
        assert tags["profile"] == "tiny" and tags["dataset_hash"]
        assert "flywheel-llm-tiny version" in champion.get("description", "")  # its card
        listed = mlflow.get("/artifacts/list", params={"run_id": champion["run_id"]}).json()
        folders = {f["path"] for f in listed["files"]}
        assert {"model_card", "eval"} <= folders, folders
        stored = list((tmp_path / "artifacts").rglob("model_card.md"))
        assert len(stored) == 2  # proxied: in the server's artifact store, one per run
    finally:
        for worker in workers:
            worker.terminate()
            worker.wait(30)
        for server in servers:
            server.stop()
