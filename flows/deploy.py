"""Deploy flow: prepare a model version for the profile's engine (convert, check its
quality), start or hot-swap the service to it, smoke test, and on any failure restore the
previous champion and serving model, failing the run.
Once the version serves, memory entries its weights now state are retired.

With `--canary` the version is served beside the champion as `canary` (serve.canary.share of
the traffic) until the monitor promotes it or rolls it back; a canary that fails its smoke
test is withdrawn.

    python -m flows.deploy --model flywheel-llm --version 3 --profile cpu-small [--canary]
"""

from __future__ import annotations

import argparse
import sys

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from components.config import PipelineConfig, load_profile
from components.memory.retire import retire_learned
from components.registry import aliases
from components.registry.aliases import CANARY, CHAMPION
from components.serving.deploy import (
    DeployError,
    DeployResult,
    client_auth,
    end_canary,
    roll_back,
    roll_out,
)
from components.serving.deploy import smoke_test as run_smoke_test
from components.serving.loading import prepare_version


@task
def prepare(model_name: str, version: str, config: PipelineConfig) -> str:
    """Convert and check the version for the profile's engine before the service loads it."""
    note = prepare_version(model_name, version, config)
    get_run_logger().info("%s", note)
    return note


@task
def release(
    model_name: str, version: str, config: PipelineConfig, port: int, served_as: str
) -> tuple[str, str]:
    return roll_out(model_name, version, config.name, port, served_as)


@task
def smoke(url: str, version: str, served_as: str) -> float:
    return run_smoke_test(url, version, served_as)


@task
def retire_memory(config: PipelineConfig, url: str, version: str) -> str:
    """Retire the memory entries the new champion states; never fails the deploy."""
    import httpx

    try:
        with httpx.Client(base_url=url, headers=client_auth(), timeout=300) as client:
            outcome = retire_learned(config.memory, client, version)
    except httpx.HTTPError as exc:
        return f"memory: not checked ({exc})"
    note = f"memory: {len(outcome.retired)} of {outcome.checked} active entries retired"
    if outcome.errors:
        note += f", {len(outcome.errors)} not judged ({'; '.join(outcome.errors[:3])})"
    get_run_logger().info("%s", note)
    return note


@task
def restore(
    model_name: str, previous: str | None, config: PipelineConfig, port: int, action: str
) -> str:
    return roll_back(model_name, previous, config.name, port, action)


@task
def withdraw(model_name: str, version: str, url: str, why: str) -> str:
    """A canary that failed to deploy: its alias removed, the service not serving it."""
    return end_canary(model_name, version, url, "rolled back", why)


@task
def start_canary(model_name: str, version: str) -> None:
    """Mark when the canary began: the monitor compares it with the champion from then on."""
    aliases.start_canary(model_name, version)


@flow(name="deploy", log_prints=True)
def deploy(
    model_name: str,
    version: str,
    config: PipelineConfig,
    previous_champion: str | None = None,
    port: int | None = None,
    canary: bool = False,
) -> dict:
    """Serve `model_name` version `version` (as champion, or as the canary); on failure roll
    back to `previous_champion`, or withdraw the canary. `config` is the run's profile (the
    service the flow starts, if none runs, reads the profile of that name)."""
    settings = config.serve
    port = port or settings.port
    url, action = f"http://127.0.0.1:{port}", "swapped"
    served_as = CANARY if canary else CHAMPION
    engine = prepare(model_name, version, config)
    if canary:
        start_canary(model_name, version)
    try:
        url, action = release(model_name, version, config, port, served_as)
        latency = smoke(url, version, served_as)
    except DeployError as exc:
        restored = (
            withdraw(model_name, version, url, f"deploy failed: {exc}")
            if canary
            else restore(model_name, previous_champion, config, port, action)
        )
        create_markdown_artifact(
            f"## Deploy of {model_name} v{version} failed\n- reason: {exc}\n- {restored}",
            key="deploy",
            description="Deploy and rollback",
        )
        raise DeployError(f"{exc}; {restored}") from None
    memory = (
        f"memory: kept (the canary answers {settings.canary.share:.0%} of the traffic)"
        if canary
        else retire_memory(config, url, version)
    )
    result = DeployResult(model_name, version, url, action, latency, memory, served_as)
    create_markdown_artifact(
        f"## {model_name} v{version} is serving as {served_as}\n- {action} at {url}\n"
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
    parser.add_argument(
        "--canary", action="store_true", help="serve it beside the champion as the canary"
    )
    args = parser.parse_args(argv)
    config = load_profile(args.profile)
    deploy(args.model, args.version, config, args.previous, canary=args.canary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
