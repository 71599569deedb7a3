"""Register: an MLflow model version with lineage, alias `challenger`, and the promotion gate.

A version holds the LoRA adapter with the tokenizer and chat template, and a reference to the
base model (name, revision, SHA-256 of its weights) rather than a 500 MB copy of it. It loads
with `mlflow.pyfunc.load_model("models:/<name>@champion")` (see pyfunc_model.py).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from components.config import ModelConfig
from components.evaluate.evaluation import HIGHER_IS_BETTER, Comparison
from components.model.base_model import BaseModelRef, resolve_base_model
from components.paths import training_prompts_dir
from components.records import read_jsonl
from components.registry.aliases import CHALLENGER, CHAMPION, current_champion, point
from components.registry.tracking import configure_mlflow, mlflow_client

# What a registered version needs to load and generate (config, model loading, generation);
# the rest of the package (deploy, monitor, ...) stays out of every version.
MODEL_CODE = ("__init__.py", "config.py", "settings.py", "paths.py", "records.py", "model")


@dataclass
class GateDecision:
    promote: bool
    reason: str
    rule: str = "frozen"  # "two-sided", or "frozen" for a first model or a small live set


@dataclass(frozen=True)
class LiveEvidence:
    """The candidate against the champion on the live set, and the gate's live settings."""

    comparison: Comparison
    size: int
    min_size: int
    margin: float  # how much worse than the champion the frozen split may get


@dataclass
class RegisterResult:
    model_name: str
    version: str
    model_uri: str
    aliases: list[str]
    gate: GateDecision
    previous_champion: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _summary(c: Comparison) -> str:
    interval = f"{c.confidence:.0%} CI of the difference [{c.low:+.4f}, {c.high:+.4f}]"
    return (
        f"{c.metric}: candidate {c.candidate_value:.4f} vs {c.reference} "
        f"{c.reference_value:.4f}, {interval}"
    )


def not_worse(c: Comparison, margin: float) -> bool:
    """Non-inferiority: the interval's worse end stays within `margin` of no difference."""
    return c.low > -margin if HIGHER_IS_BETTER[c.metric] else c.high < margin


def decide_promotion(
    frozen: Comparison, live: LiveEvidence | None = None, anchor: Comparison | None = None
) -> GateDecision:
    """The promotion gate.

    Two-sided, once there is a champion and a live set of at least `min_size` items: promote
    when the candidate is better on the live set (the interval of the difference lies above 0)
    and not worse on the frozen split beyond the margin, against the champion and against the
    `anchor` (the first champion, or the profile's pin), so that promotions in a row cannot
    add up to more than the margin. Otherwise the frozen split alone decides: promote only if
    the candidate beats the reference beyond the interval.
    """
    if live is None or frozen.reference != "champion" or live.size < live.min_size:
        why = (
            "no champion yet"
            if frozen.reference != "champion"
            else f"live set of {live.size if live else 0} items, fewer than "
            f"{live.min_size if live else 'the minimum'}"
        )
        rule = f"frozen-split rule ({why})"
        if frozen.candidate_is_better:
            reason = f"promoted by the {rule}: {_summary(frozen)} lies on the better side of 0"
            return GateDecision(True, reason, "frozen")
        reason = (
            f"kept the {frozen.reference} by the {rule}: {_summary(frozen)} includes 0 or is worse"
        )
        return GateDecision(False, reason, "frozen")
    better = live.comparison.candidate_is_better
    safe = not_worse(frozen, live.margin)
    live_part = f"live set ({live.size} items) {_summary(live.comparison)}: " + (
        "better" if better else "not better"
    )
    frozen_part = f"frozen split {_summary(frozen)}: " + (
        f"not worse beyond the margin {live.margin:g}" if safe else f"worse beyond {live.margin:g}"
    )
    if anchor is not None:
        anchored = not_worse(anchor, live.margin)
        frozen_part += f"; {_summary(anchor)}: " + (
            "not worse beyond the margin" if anchored else f"worse beyond {live.margin:g}"
        )
        safe = safe and anchored
    verdict = "promoted" if better and safe else "kept the champion"
    return GateDecision(
        better and safe, f"{verdict} by the two-sided rule: {live_part}; {frozen_part}", "two-sided"
    )


def training_prompts(run_id: str) -> list[str]:
    """The prompts a training run trained on (its logged `data/train.jsonl`), cached under the
    home folder: the champion's domain for the monitor's drift check and the router."""
    import mlflow

    folder = training_prompts_dir(run_id)
    cached = list(folder.rglob("train.jsonl"))
    path = (
        cached[0]
        if cached
        else Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id,
                artifact_path="data/train.jsonl",
                dst_path=str(folder),
                tracking_uri=configure_mlflow(),
            )
        )
    )
    return [r["instruction"] for r in read_jsonl(path)]


def learned_corrections(run_id: str, dest: Path) -> frozenset[str] | None:
    """The corrections a training run's weights learned (the keys in its logged
    `data/learned.json`), or None for a run that did not record them."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path="data/learned.json",
            dst_path=str(dest),
            tracking_uri=configure_mlflow(),
        )
    except (MlflowException, OSError):
        return None
    return frozenset(json.loads(Path(path).read_text()))


def download_version(model_name: str, version: str, dest: Path) -> tuple[str, str]:
    """Fetch a registered version's adapter; returns (base model folder, adapter folder)."""
    import mlflow

    uri = f"models:/{model_name}/{version}"
    local = Path(
        mlflow.artifacts.download_artifacts(
            uri, dst_path=str(dest), tracking_uri=configure_mlflow()
        )
    )
    ref = json.loads((local / "artifacts" / "base_model.json").read_text())
    base = resolve_base_model(ModelConfig(base_model=ref["name"], revision=ref["revision"]))
    if base.sha256 != ref["sha256"]:
        raise RuntimeError(
            f"version {version} was trained on base weights {ref['sha256'][:12]}, but "
            f"'{ref['name']}' now resolves to {base.sha256[:12]}"
        )
    return base.path, str(local / "artifacts" / "adapter")


def model_code(dest: Path) -> Path:
    """A `components` package holding only `MODEL_CODE`, for the logged model's code path."""

    package = Path(__file__).resolve().parents[1]
    target = dest / "components"
    target.mkdir(parents=True)
    for name in MODEL_CODE:
        source = package / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target / name)
    return target


def register_candidate(
    run_id: str,
    model_name: str,
    adapter_dir: str,
    base: BaseModelRef,
    tags: dict[str, str],
    comparison: Comparison,
    live: LiveEvidence | None = None,
    promote_to: str = CHAMPION,
    anchor: Comparison | None = None,
) -> RegisterResult:
    """Log the adapter as a model, register it as `challenger`, and apply the gate: a version
    it promotes gets the alias `promote_to` (`champion`, or `canary` to be tried on live
    traffic first)."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    client = mlflow_client()
    previous = current_champion(model_name)
    with tempfile.TemporaryDirectory() as tmp:
        ref_path = Path(tmp) / "base_model.json"
        ref_path.write_text(json.dumps(base.to_dict(), indent=1))
        signature = ModelSignature(
            inputs=Schema([ColSpec("string", "prompt")]),
            outputs=Schema([ColSpec("string")]),
            params=ParamSchema([ParamSpec("max_new_tokens", "long", 64)]),
        )
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                artifacts={"adapter": adapter_dir, "base_model": str(ref_path)},
                signature=signature,
                code_paths=[str(model_code(Path(tmp) / "code"))],
                pip_requirements=["torch", "transformers", "peft", "accelerate"],
            )
    version = mlflow.register_model(info.model_uri, model_name, tags=tags)
    point(model_name, CHALLENGER, version.version)

    gate = decide_promotion(comparison, live, anchor)
    aliases = [CHALLENGER]
    if gate.promote:
        point(model_name, promote_to, version.version)
        aliases.append(promote_to)
    evidence = {
        "frozen": comparison,
        **({"live": live.comparison} if live else {}),
        **({"anchor": anchor} if anchor else {}),
    }
    for key, value in {
        "gate.decision": "promoted" if gate.promote else "rejected",
        "gate.reason": gate.reason,
        "gate.rule": gate.rule,
        "gate.live_size": str(live.size if live else 0),
        **{
            f"gate.{name}.{part}": f"{getattr(c, part):.4f}"
            for name, c in evidence.items()
            for part in ("difference", "low", "high")
        },
    }.items():
        client.set_model_version_tag(model_name, version.version, key, value)
    return RegisterResult(
        model_name=model_name,
        version=str(version.version),
        model_uri=f"models:/{model_name}/{version.version}",
        aliases=aliases,
        gate=gate,
        previous_champion=str(previous.version) if previous else None,
    )
