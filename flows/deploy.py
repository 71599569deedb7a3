"""Deploy flow: prepare a model version for the profile's engine (convert, check its
quality), start or hot-swap the service to it, smoke test, and on any failure restore the
previous champion and serving model, failing the run.
Once the version serves, memory entries its weights now state are retired.

    python -m flows.deploy --model flywheel-llm --version 3 --profile cpu-small
"""

from __future__ import annotations

import argparse
import sys

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from components.config import load_profile
from components.memory.retire import retire_learned
from components.serving.deploy import (
    DeployError,
    DeployResult,
    client_auth,
    roll_back,
    roll_out,
)
from components.serving.deploy import smoke_test as run_smoke_test
from components.serving.model import prepare_version


@task
def prepare(model_name: str, version: str, profile: str) -> str:
    """Convert and check the version for the profile's engine before the service loads it."""
    note = prepare_version(model_name, version, load_profile(profile))
    get_run_logger().info("%s", note)
    return note


@task
def release(model_name: str, version: str, profile: str, port: int) -> tuple[str, str]:
    return roll_out(model_name, version, profile, port)


@task
def smoke(url: str, version: str) -> float:
    return run_smoke_test(url, version)


@task
def retire_memory(profile: str, url: str, version: str) -> str:
    """Retire the memory entries the new champion states; never fails the deploy."""
    import httpx

    try:
        with httpx.Client(base_url=url, headers=client_auth(), timeout=300) as client:
            outcome = retire_learned(load_profile(profile).memory, client, version)
    except httpx.HTTPError as exc:
        return f"memory: not checked ({exc})"
    note = f"memory: {len(outcome.retired)} of {outcome.checked} active entries retired"
    if outcome.errors:
        note += f", {len(outcome.errors)} not judged ({'; '.join(outcome.errors[:3])})"
    get_run_logger().info("%s", note)
    return note


@task
def restore(model_name: str, previous: str | None, profile: str, port: int, action: str) -> str:
    return roll_back(model_name, previous, profile, port, action)


@flow(name="deploy", log_prints=True)
def deploy(
    model_name: str,
    version: str,
    profile: str = "cpu-small",
    previous_champion: str | None = None,
    port: int | None = None,
) -> dict:
    """Serve `model_name` version `version`; roll back to `previous_champion` on failure."""
    port = port or load_profile(profile).serve.port
    url, action = f"http://127.0.0.1:{port}", "swapped"
    engine = prepare(model_name, version, profile)
    try:
        url, action = release(model_name, version, profile, port)
        latency = smoke(url, version)
    except DeployError as exc:
        restored = restore(model_name, previous_champion, profile, port, action)
        create_markdown_artifact(
            f"## Deploy of {model_name} v{version} failed\n- reason: {exc}\n- {restored}",
            key="deploy",
            description="Deploy and rollback",
        )
        raise DeployError(f"{exc}; {restored}") from None
    memory = retire_memory(profile, url, version)
    result = DeployResult(model_name, version, url, action, latency, memory)
    create_markdown_artifact(
        f"## {model_name} v{version} is serving\n- {action} at {url}\n"
        f"- {engine}\n- smoke test: one generation in {latency:.0f} ms\n- {memory}",
        key="deploy",
        description="Deploy and rollback",
    )
    get_run_logger().info("%s v%s %s at %s", model_name, version, action, url)
    return result.to_dict()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--profile", default="cpu-small")
    parser.add_argument("--previous", default=None, help="version to restore on failure")
    args = parser.parse_args(argv)
    deploy(args.model, args.version, args.profile, args.previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
