"""Which model to serve and how it is loaded: resolve a registry URI, fetch the version's
weights, convert and check them for the configured engine, or fall back to the reference."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.config import PipelineConfig, ServeConfig, load_profile
from components.model.base_model import resolve_base_model
from components.model.chat import load_tokenizer
from components.model.generation import load_for_inference
from components.paths import serving_dir, tracking_uri
from components.registry.register import download_version
from components.registry.tracking import mlflow_client
from components.serving.convert import openvino_folder
from components.serving.engine import Engine, OpenVINOEngine, TransformersEngine
from components.serving.quality import EngineRejected, check_engine, checked_once
from components.settings import settings

log = logging.getLogger("flywheel.generator")


def serving_profile() -> PipelineConfig:
    """The profile the service runs with (`FLYWHEEL_PROFILE`, default cpu-small)."""
    return load_profile(settings().profile)


def serve_settings() -> ServeConfig:
    return serving_profile().serve


def default_model_uri(config: PipelineConfig | None = None) -> str:
    """`FLYWHEEL_MODEL_URI`, else the profile's `serve.models.champion` (its registered model
    at alias `champion` unless the profile says otherwise)."""
    config = config or serving_profile()
    return settings().model_uri or config.serve.models["champion"]


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: str
    engine: Engine
    tokenizer: Any
    context_length: int
    fallback: str | None = None  # why the configured engine is not the one serving
    quality: str | None = None  # the converted engine's quality check, when it serves


class ModelNotFound(LookupError):
    """The registry has no such model version or alias."""


BASE = "base"  # the source, and the version label, of the base model served without adapter


def resolve_model_uri(uri: str, config: PipelineConfig | None = None) -> tuple[str, str]:
    """A model source -> (name, version): `models:/name@alias`, `models:/name/version`,
    `@alias` (of the profile's registered model), or `base` (the profile's base model, version
    label `base`)."""
    config = config or serving_profile()
    if uri == BASE:
        return config.model.base_model, BASE
    if uri.startswith("@"):
        uri = f"models:/{config.registry.model_name}{uri}"
    if not uri.startswith("models:/"):
        raise ValueError(
            f"model URI must look like models:/<name>@<alias>, models:/<name>/<version>, "
            f"@<alias> or base, got {uri!r}"
        )
    from mlflow.exceptions import MlflowException

    ref = uri.removeprefix("models:/")
    client = mlflow_client()
    name, sep, alias = ref.partition("@")
    try:
        if sep:
            return name, str(client.get_model_version_by_alias(name, alias).version)
        name, version = ref.rsplit("/", 1)
        return name, str(client.get_model_version(name, version).version)
    except MlflowException:
        what = f"no {alias} for {name}" if sep else f"no version {ref}"
        raise ModelNotFound(f"{what} in {tracking_uri()}: run make train first") from None


def load_model_version(name: str, version: str, config: PipelineConfig) -> LoadedModel:
    """Load a registered version (its adapter over its base), or the profile's base model
    alone (version `base`), on the configured engine; if the engine cannot take it, load it on
    the transformers reference and say why."""
    from transformers import AutoConfig

    with _weights(name, version, config) as (cache, base_path, adapter_dir):
        tokenizer = load_tokenizer(adapter_dir or base_path, padding_side="left")
        architecture = AutoConfig.from_pretrained(base_path)
        context = int(getattr(architecture, "max_position_embeddings", 2048))
        loaded, fallback = None, None
        if config.serve.engine.name == "openvino":
            try:
                served, quality = openvino_engine(cache, base_path, adapter_dir, tokenizer, config)
                loaded = LoadedModel(name, version, served, tokenizer, context, quality=quality)
            except Exception as exc:
                fallback = f"cannot serve version {version} on OpenVINO: {exc}"
                log.warning("%s; serving it on transformers", fallback)
        if loaded is None:
            reference = transformers_engine(base_path, adapter_dir)
            loaded = LoadedModel(name, version, reference, tokenizer, context, fallback)
    if version != BASE:
        record_engine(loaded)
    return loaded


@contextlib.contextmanager
def _weights(
    name: str, version: str, config: PipelineConfig
) -> Iterator[tuple[Path, str, str | None]]:
    """(the version's cache folder, base model folder, adapter folder or None), the adapter
    downloaded into a temporary folder that lasts while the model loads."""
    if version == BASE:
        base = resolve_base_model(config.model)
        cache = serving_dir(BASE, base.sha256[:16])
        cache.mkdir(parents=True, exist_ok=True)
        yield cache, base.path, None
        return

    cache = serving_dir(name, version)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        base_path, adapter_dir = download_version(name, version, Path(tmp))
        yield cache, base_path, adapter_dir


def prepare_version(name: str, version: str, config: PipelineConfig) -> str:
    """Convert and check a version for the profile's engine ahead of serving it, so that the
    service loads it in seconds (the deploy flow runs this); says what will serve it."""
    if config.serve.engine.name == "transformers":
        return "engine: transformers (the reference)"
    loaded = load_model_version(name, version, config)
    loaded.engine.close()
    return f"engine: {loaded.engine.name} ({loaded.fallback or loaded.quality})"


def openvino_engine(
    cache: Path, base_path: str, adapter_dir: str | None, tokenizer: Any, config: PipelineConfig
) -> tuple[Engine, str]:
    """The version on OpenVINO, once its answers passed the quality check (and the check's
    summary); `EngineRejected` if they did not."""
    engine = config.serve.engine
    folder = openvino_folder(cache, base_path, adapter_dir, engine.weights)
    served = OpenVINOEngine(folder, tokenizer, engine)
    quality = checked_once(
        folder,
        lambda: check_engine(served, tokenizer, base_path, adapter_dir, config),
    )
    log.info("quality check: %s", quality.summary())
    if not quality.passed:
        served.close()
        raise EngineRejected(quality.summary())
    return served, quality.summary()


def record_engine(loaded: LoadedModel) -> None:
    """Say on the registered version which engine serves it, and why."""
    tags = {"serving.engine": loaded.engine.name}
    if loaded.quality:
        tags["serving.quality"] = loaded.quality
    if loaded.fallback:
        tags["serving.fallback"] = loaded.fallback
    try:
        client = mlflow_client()
        for key, value in tags.items():
            client.set_model_version_tag(loaded.name, loaded.version, key, value[:5000])
    except Exception as exc:  # the registry being away never stops serving
        log.warning("could not record the engine on version %s: %s", loaded.version, exc)


def transformers_engine(base_path: str, adapter_dir: str | None) -> Engine:
    return TransformersEngine(*load_for_inference(base_path, adapter_dir))
