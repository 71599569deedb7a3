"""Typed pipeline configuration, loaded from a run profile (`deployments/profiles/*.yaml`).

One pydantic model per stage, assembled into `PipelineConfig`. Unknown keys are an error, so
a typo in a profile fails loudly instead of silently falling back to a default.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from components.paths import REPO_ROOT, resolve_path
from components.settings import settings

PROFILES_DIR = REPO_ROOT / "deployments" / "profiles"


class ProfileError(ValueError):
    """A run profile that cannot be read or does not validate."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


SourceFormat = Literal["auto", "jsonl", "csv", "parquet", "hf_disk", "hf_hub", "feedback"]


class SourceConfig(StrictModel):
    """One input source. `path` is a file or folder, or a hub dataset id for `hf_hub`."""

    path: str
    format: SourceFormat = "auto"
    split: str = "train"


class DataConfig(StrictModel):
    sources: list[SourceConfig] = Field(min_length=1)
    test_path: str = "data/seed/test.jsonl"
    # Curated feedback versions; unset: `$FLYWHEEL_HOME/curated` (`FLYWHEEL_CURATED_DIR` wins).
    feedback_dir: str | None = None
    validation_fraction: float = Field(default=0.1, ge=0.0, lt=0.5)
    max_train_examples: int | None = Field(default=None, gt=0)
    seed: int = 1234


class CleanConfig(StrictModel):
    scrub_pii: bool = True
    min_instruction_chars: int = Field(default=3, ge=1)
    min_response_chars: int = Field(default=2, ge=1)
    max_tokens: int = Field(default=512, gt=8)
    min_letter_ratio: float = Field(default=0.5, ge=0.0, le=1.0)
    near_dup_threshold: float = Field(default=0.9, gt=0.0, le=1.0)
    minhash_permutations: int = Field(default=128, ge=16)
    shingle_words: int = Field(default=5, ge=1)
    decontam_ngram: int = Field(default=10, ge=3)
    # examples this likely toxic or profane are dropped (components/content.py); None: keep all
    max_profanity: float | None = Field(default=0.9, gt=0.0, le=1.0)


class ModelConfig(StrictModel):
    """The base model: a built-in name, a Hugging Face model id, or a local folder."""

    base_model: str = "smollm2-135m-instruct"
    revision: str | None = None
    trust_remote_code: bool = False


class LoraSettings(StrictModel):
    r: int = Field(default=16, gt=0)
    alpha: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"


class QuantizationConfig(StrictModel):
    """4-bit loading for QLoRA. `compute_dtype: auto` picks it from the device."""

    load_in_4bit: bool = False
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class TrainConfig(StrictModel):
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int = Field(default=-1, ge=-1)
    batch_size: int = Field(default=8, gt=0)
    gradient_accumulation_steps: int = Field(default=1, gt=0)
    learning_rate: float = Field(default=2e-4, gt=0)
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    max_seq_len: int = Field(default=256, gt=8)
    save_steps: int = Field(default=50, gt=0)
    save_total_limit: int = Field(default=2, gt=0)
    logging_steps: int = Field(default=5, gt=0)
    gradient_checkpointing: bool = False
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    seed: int = 1234
    # An `accelerate launch` config (deployments/accelerate/): training then runs in the
    # processes it starts, one per GPU (DDP or FSDP). None: in the flow's own process.
    accelerate_config: str | None = None

    @model_validator(mode="after")
    def _accelerate_config_exists(self) -> TrainConfig:
        if self.accelerate_config and not resolve_path(self.accelerate_config).is_file():
            raise ValueError(f"accelerate_config: no file {resolve_path(self.accelerate_config)}")
        return self


class RecipeConfig(StrictModel):
    """How a retrain learns curated corrections (see components/train/recipe.py)."""

    question_variants: int = Field(default=5, ge=0)  # rewrites of each curated question
    min_variant_similarity: float = Field(default=0.75, ge=0, le=1)  # embedding filter
    curated_repeats: int = Field(default=1, ge=1)  # each curated group, per epoch
    # Rewrites never trained on: judged in the live set, and the early-stopping set.
    held_out_variants: int = Field(default=1, ge=0)
    stop_variants: int = Field(default=0, ge=0)
    # Stop when the early-stopping set's loss has not improved for this many evaluations,
    # one every `stop_eval_steps` steps, and keep the best checkpoint (0: train to the end).
    early_stopping_patience: int = Field(default=0, ge=0)
    stop_eval_steps: int = Field(default=5, gt=0)
    # Epochs by data size: a small training set trains for more epochs, until it makes
    # `min_steps` optimizer steps, up to `max_epochs` (never fewer than `train.epochs`).
    min_steps: int = Field(default=0, ge=0)
    max_epochs: float = Field(default=3.0, gt=0)
    # `champion`: a retrain continues the champion's adapter, which already knows the seed
    # data, so it learns the corrections with less to relearn and forget; a first model, or a
    # champion of another base model or LoRA rank, starts from the base. `base`: always fresh.
    start: Literal["base", "champion"] = "champion"
    # Continuing the champion, a retrain trains on the corrections it has not learned yet and
    # replays at most this many of those it learned (a fresh sample each retrain, each seen
    # once per epoch with its rewrites), so its cost follows what is new, not the history.
    replay: int = Field(default=24, ge=0)

    @model_validator(mode="after")
    def _stopping_needs_its_set(self) -> RecipeConfig:
        if self.early_stopping_patience and not self.stop_variants:
            raise ValueError(
                "recipe.early_stopping_patience needs recipe.stop_variants > 0 "
                "(the held-out rewrites it stops on)"
            )
        return self


class EvalConfig(StrictModel):
    max_new_tokens: int = Field(default=64, gt=0)
    batch_size: int = Field(default=16, gt=0)
    max_examples: int | None = Field(default=None, gt=0)
    bootstrap_samples: int = Field(default=1000, ge=100)
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)
    gate_metric: Literal["rouge_l", "bleu", "exact_match", "perplexity"] = "rouge_l"
    samples_to_log: int = Field(default=20, ge=0)
    # The two-sided gate: a candidate must be better on the live set (the corrections and
    # held-out rephrasings of them) and not worse on the frozen split beyond the margin (in
    # `gate_metric` units). Below `live_min_size` live items the frozen split alone decides.
    live_metric: Literal["rouge_l", "bleu", "exact_match"] = "rouge_l"
    live_min_size: int = Field(default=8, gt=0)
    non_inferiority_margin: float = Field(default=0.02, ge=0)
    # The anchor: a candidate must also be not worse than this version beyond the margin, so
    # the margin is a total budget, not a step each retrain may take. None: the first
    # champion (the registry's `anchor` alias, set with it).
    anchor_version: int | None = Field(default=None, gt=0)
    live_holdout_fraction: float = Field(default=0.5, gt=0, lt=1)


class RegistryConfig(StrictModel):
    model_name: str = "flywheel-llm"
    experiment: str = "flywheel"
    log_merged_weights: bool = False


class EngineConfig(StrictModel):
    """The runtime behind the generator.

    `transformers` is the reference (static batches, float32) and the fallback. `openvino`
    serves the champion on OpenVINO GenAI's continuous-batching engine: the adapter merged
    and the weights compressed (`weights`) once per version, cached under the home folder.
    If the version cannot be converted, the service says why and serves on `transformers`.
    """

    name: Literal["transformers", "openvino"] = "transformers"
    weights: Literal["int8", "int4", "fp32"] = "int8"
    kv_cache_gb: float = Field(default=1.0, gt=0)
    max_batched_tokens: int = Field(default=2048, gt=0)  # per scheduler step, prompts included
    # Reuse the KV cache of a prompt prefix already computed (the chat template's system turn,
    # a conversation's earlier turns) instead of computing it again for every request.
    prefix_caching: bool = True


class ResponseCacheConfig(StrictModel):
    """Answers to deterministic (greedy) requests, reused for the same request to the same
    model version. `memory` is per generator process; `redis` is shared and outlives restarts
    (`redis_url`, or the `FLYWHEEL_REDIS_URL` environment variable)."""

    enabled: bool = True
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    max_entries: int = Field(default=10_000, gt=0)  # memory backend
    ttl_s: int = Field(default=86_400, gt=0)  # redis backend
    timeout_s: float = Field(default=0.2, gt=0)  # a slow or absent server is a miss after this


class TracingConfig(StrictModel):
    """OpenTelemetry traces of each request through the gateway, the generator and its batch,
    exported over OTLP/HTTP to `endpoint` (default: the standard
    `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else a collector on localhost:4318). Off by default;
    every answer carries its trace id (`x-trace-id`, and in the inference log) either way."""

    enabled: bool = False
    endpoint: str | None = None  # e.g. http://collector:4318/v1/traces
    sample_rate: float = Field(default=1.0, ge=0, le=1)  # of requests that start a trace


class RoutingConfig(StrictModel):
    """Which answer a question gets: in the champion's domain (components/domain.py: at least
    `min_similarity` to one of its training prompts) the champion's (or the canary's); outside
    it the `scope_reply`, or the answer of the served model `out_of_domain` names (`general`,
    say, for a model listed in `serve.models`; `champion` judges and logs only). Each decision
    and its similarity are logged per request."""

    enabled: bool = False
    min_similarity: float = Field(default=0.3, gt=0, le=1)
    out_of_domain: str = "scope_reply"  # or the name of a model in `serve.models`
    scope_reply: str = Field(
        default="Sorry, I can only help with questions about Flywheel: training, evaluating, "
        "serving and monitoring its models.",
        min_length=1,
    )


class CanaryConfig(StrictModel):
    """Champion/challenger canary. With `enabled`, a version the offline gate promotes gets the
    alias `canary` instead of `champion`; the deploy flow serves it beside the champion, and
    `share` of the traffic the router gives the champion goes to it, sticky per user or
    conversation when the client sends an id. The monitor compares the two on the same window:
    the canary is rolled back when its thumbs-down rate is significantly higher
    (`monitor.significance`) or its p95 latency more than `max_latency_factor` times the
    champion's, and promoted once `min_feedback` of its answers are rated without either."""

    enabled: bool = False
    share: float = Field(default=0.1, gt=0, lt=1)
    min_feedback: int = Field(default=20, gt=0)
    min_requests: int = Field(default=20, gt=0)  # answers of each before latency is compared
    max_latency_factor: float = Field(default=1.5, gt=1)


MODEL_NAME = r"^[a-z][a-z0-9_-]{0,15}$"  # fits the inference log's route column


class ServeConfig(StrictModel):
    """How the BentoML service serves the champion."""

    engine: EngineConfig = EngineConfig()
    # The models the generator holds, by name: a registry alias of the profile's model
    # (`@champion`), a registry URI (`models:/name/3`), or `base`: the base model without an
    # adapter (a general model for questions outside the champion's domain). A request names
    # one in `model`; otherwise the router and the canary choose. `champion` is required;
    # `canary` is the canary's (`canary.enabled`), loaded while the registry has that alias.
    models: dict[str, str] = {"champion": "@champion"}
    memory_budget_gb: float | None = Field(default=None, gt=0)  # weights + KV caches, all models
    routing: RoutingConfig = RoutingConfig()
    canary: CanaryConfig = CanaryConfig()
    cache: ResponseCacheConfig = ResponseCacheConfig()
    tracing: TracingConfig = TracingConfig()
    port: int = Field(default=3000, gt=0, lt=65536)
    batching: bool = True
    max_batch_size: int = Field(default=16, gt=0)
    max_latency_ms: int = Field(default=30_000, gt=0)
    max_concurrency: int = Field(default=64, gt=0)
    request_timeout_s: int = Field(default=120, gt=0)
    default_max_new_tokens: int = Field(default=64, gt=0)
    max_new_tokens_limit: int = Field(default=256, gt=0)
    max_prompt_chars: int = Field(default=16_000, gt=0)
    log_prompts: Literal["full", "redacted", "off"] = "full"
    warmup: bool = True
    # How often each model served from a registry alias checks where the alias points; a
    # move is followed: the version is loaded, checked and swapped in (0: never follow).
    follow_s: float = Field(default=30.0, ge=0)
    deploy_on_promotion: bool = False
    # Proxies (addresses or networks) whose `X-Forwarded-For` names the client, when clients
    # have no keys; any other peer is the client itself.
    trusted_proxies: list[str] = []

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an address or network") from None
        return value

    @model_validator(mode="after")
    def _named_models(self) -> ServeConfig:
        if "champion" not in self.models:
            raise ValueError("serve.models must name a `champion`")
        if "canary" in self.models:
            raise ValueError("serve.models: `canary` is the canary's (serve.canary), not a name")
        for name, source in self.models.items():
            if not re.match(MODEL_NAME, name):
                raise ValueError(f"serve.models: {name!r} is not a model name ({MODEL_NAME})")
            if source != "base" and not source.startswith(("@", "models:/")):
                raise ValueError(
                    f"serve.models.{name}: {source!r} is not `@<alias>`, `models:/...` or `base`"
                )
        target = self.routing.out_of_domain
        if target != "scope_reply" and target not in self.models:
            raise ValueError(
                f"serve.routing.out_of_domain: {target!r} is neither `scope_reply` nor a model "
                f"in serve.models ({', '.join(self.models)})"
            )
        return self


class MonitorConfig(StrictModel):
    """When the monitor calls for a retrain. Each check reports its figure and threshold."""

    interval_minutes: float = Field(default=60, gt=0)  # the `monitor/<profile>` schedule
    service_url: str | None = None  # default: http://127.0.0.1:<serve.port>
    min_requests: int = Field(default=20, gt=0)  # latency and error checks need this many
    max_error_rate: float = Field(default=0.05, ge=0, le=1)
    max_p95_latency_s: float | None = Field(default=None, gt=0)
    latency_regression_factor: float = Field(default=2.0, gt=1)  # p95 vs the version's baseline
    min_feedback: int = Field(default=20, gt=0)
    baseline_down_rate: float = Field(default=0.2, ge=0, lt=1)  # until the champion has its own
    significance: float = Field(default=0.01, gt=0, lt=0.5)
    min_prompts: int = Field(default=20, gt=1)  # drift checks need this many live prompts
    max_length_ks: float = Field(default=0.3, gt=0, le=1)
    max_domain_auc: float = Field(default=0.8, gt=0.5, le=1)
    cooldown_minutes: float = Field(default=120, ge=0)
    low_confidence: float = Field(default=0.3, ge=0, le=1)  # answers below go to review
    # The memory lowers the thumbs-down rate by itself, so corrections it serves that the
    # champion was not trained on (accepted after it was registered) call for a retrain too.
    memory_corrections_to_retrain: int | None = Field(default=10, gt=0)
    # Where the flows push retrain outcomes and decisions (FLYWHEEL_PUSHGATEWAY_URL overrides)
    pushgateway_url: str | None = None
    # Several replicas: the fleet's metrics, summed over every target of the scrape job
    # `prometheus_job`, are read from this Prometheus instead of one service's /metrics.
    prometheus_url: str | None = None
    prometheus_job: str = "flywheel"


class MemoryConfig(StrictModel):
    """The correction memory: accepted corrections answer the next askers at once.

    `trust: reviewed` serves only corrections approved or made in Label Studio;
    `trust: feedback` also serves corrections sent to `POST /feedback`, once `min_agreement`
    different clients sent the same one, within the per-client rate and size limits.

    An entry answers only a question that asks the same thing (`components/memory/scope.py`):
    its correction fits the question by `threshold`, better than any other by `margin`, and
    the question names every word that tells the entry apart from its family (`entity_match`);
    otherwise the memory abstains and the model answers."""

    enabled: bool = True
    threshold: float = Field(default=0.55, gt=0, le=1)  # cosine, the question to the correction
    margin: float = Field(default=0.03, ge=0, lt=1)  # the best fit over the runner-up
    same_question: float = Field(default=0.95, gt=0, le=1)  # cosine of the two questions
    entity_match: float = Field(default=0.45, ge=0, le=1)  # a distinguishing word to a phrase
    family: float = Field(default=0.6, gt=0, le=1)  # corrections this similar are siblings
    trust: Literal["reviewed", "feedback"] = "reviewed"
    min_agreement: int = Field(default=1, ge=1)
    max_correction_chars: int = Field(default=2000, gt=0)
    corrections_per_client_per_hour: int = Field(default=30, gt=0)
    # corrections this likely toxic or profane are refused (components/content.py); None: off
    max_profanity: float | None = Field(default=0.9, gt=0.0, le=1.0)
    embedding_model: str = "all-minilm-l6-v2"  # built in, or a local sentence-embedding folder


class RetrievalConfig(StrictModel):
    """Grounded answers: the `top_k` passages of a documentation corpus most relevant to the
    question (BM25) are given to the model with it, and the answer names them as sources.
    `corpus` lists Markdown or text files and folders (relative to the repository or
    absolute); passages that share a word n-gram with a frozen test answer are left out."""

    enabled: bool = False
    corpus: list[str] = ["docs"]
    top_k: int = Field(default=3, ge=1, le=20)
    passage_chars: int = Field(default=700, ge=100)  # a section is split into passages this long
    min_score: float = Field(default=0.0, ge=0)  # BM25 score below which a passage is not given

    @model_validator(mode="after")
    def _corpus_exists(self) -> RetrievalConfig:
        missing = [str(resolve_path(c)) for c in self.corpus if not resolve_path(c).exists()]
        if self.enabled and missing:
            raise ValueError(f"corpus: no file or folder {', '.join(missing)}")
        return self


class ReviewConfig(StrictModel):
    """The Label Studio review project (server URL and token come from the environment)."""

    project_title: str = "Flywheel answer review"
    max_tasks_per_sync: int = Field(default=200, gt=0)


class PipelineConfig(StrictModel):
    """Everything one training-pipeline run needs, validated as a whole."""

    name: str
    description: str = ""
    data: DataConfig
    clean: CleanConfig = CleanConfig()
    model: ModelConfig = ModelConfig()
    lora: LoraSettings = LoraSettings()
    quantization: QuantizationConfig = QuantizationConfig()
    train: TrainConfig = TrainConfig()
    recipe: RecipeConfig = RecipeConfig()
    eval: EvalConfig = EvalConfig()
    registry: RegistryConfig = RegistryConfig()
    serve: ServeConfig = ServeConfig()
    monitor: MonitorConfig = MonitorConfig()
    review: ReviewConfig = ReviewConfig()
    memory: MemoryConfig = MemoryConfig()
    retrieval: RetrievalConfig = RetrievalConfig()


def profile_path(profile: str | Path) -> Path:
    """Map a profile name (`tiny`) or path to the YAML file."""
    candidate = Path(profile)
    if candidate.suffix in {".yaml", ".yml"}:
        return resolve_path(candidate)
    return PROFILES_DIR / f"{profile}.yaml"


def available_profiles() -> list[str]:
    """Names of the profiles shipped in `deployments/profiles/`."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key (check the spelling; see components/config.py)")
        else:
            lines.append(f"  {where}: {item['msg']}")
    return "\n".join(lines)


def parse_profile(raw: dict, source: str = "<profile>") -> PipelineConfig:
    """Validate a profile already read into a dict."""
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ProfileError(f"invalid profile {source}:\n{_describe(exc)}") from None


OVERRIDES_ENV = "FLYWHEEL_SET"


def env_overrides() -> list[str]:
    """Settings from `FLYWHEEL_SET` (`"serve.port=3100 serve.batching=false"`), shell-quoted."""
    import shlex

    return shlex.split(settings().profile_overrides)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `raw` with `section.key=value` settings applied; values are read as YAML
    (`3100` is a number, `false` a boolean, `[a, b]` a list). Validation happens afterwards,
    so a misspelt key is rejected like one in the file."""
    result = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ProfileError(f"override {item!r}: expected section.key=value")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ProfileError(f"override {item!r}: the value is not valid YAML: {exc}") from None
        node = result
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ProfileError(f"override {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = parsed
    return result


def load_profile(profile: str | Path, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Read and validate a run profile by name or path, with `FLYWHEEL_SET` and then
    `overrides` applied over it."""
    path = profile_path(profile)
    if not path.is_file():
        names = ", ".join(available_profiles())
        raise ProfileError(f"profile not found: {path} (shipped profiles: {names})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ProfileError(f"{path} must contain a mapping at the top level")
    changes = [*env_overrides(), *overrides]
    source = f"{path} with {' '.join(changes)}" if changes else str(path)
    return parse_profile(apply_overrides(raw, changes), source)
