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
from components.evaluate.evaluation import Comparison
from components.model.base_model import BaseModelRef, resolve_base_model

CHAMPION = "champion"
CHALLENGER = "challenger"
# What a registered version needs to load and generate (config, model loading, generation);
# the rest of the package (deploy, monitor, ...) stays out of every version.
MODEL_CODE = ("__init__.py", "config.py", "paths.py", "records.py", "model")


@dataclass
class GateDecision:
    promote: bool
    reason: str


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


def decide_promotion(comparison: Comparison) -> GateDecision:
    """Promote only if the candidate beats the reference beyond the confidence interval."""
    c = comparison
    interval = f"{c.confidence:.0%} CI of the difference [{c.low:+.4f}, {c.high:+.4f}]"
    summary = (
        f"{c.metric}: candidate {c.candidate_value:.4f} vs {c.reference} "
        f"{c.reference_value:.4f}, {interval}"
    )
    if c.candidate_is_better:
        return GateDecision(True, f"promoted: {summary} lies entirely on the better side of 0")
    return GateDecision(False, f"kept the {c.reference}: {summary} includes 0 or is worse")


def current_champion(model_name: str) -> Any | None:
    """The model version the `champion` alias points to, or None."""
    from mlflow.exceptions import MlflowException

    from components.registry.tracking import mlflow_client

    try:
        return mlflow_client().get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def download_version(model_name: str, version: str, dest: Path) -> tuple[str, str]:
    """Fetch a registered version's adapter; returns (base model folder, adapter folder)."""
    import mlflow

    from components.registry.tracking import configure_mlflow

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
) -> RegisterResult:
    """Log the adapter as a model, register it as `challenger`, and apply the gate."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from components.registry.tracking import mlflow_client

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
    client.set_registered_model_alias(model_name, CHALLENGER, version.version)

    gate = decide_promotion(comparison)
    aliases = [CHALLENGER]
    if gate.promote:
        client.set_registered_model_alias(model_name, CHAMPION, version.version)
        aliases.append(CHAMPION)
    for key, value in {
        "gate.decision": "promoted" if gate.promote else "rejected",
        "gate.reason": gate.reason,
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
