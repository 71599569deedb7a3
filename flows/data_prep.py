"""Data stage: ingest every source, clean, and split against the frozen test set."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from prefect import flow, task

from components.config import PipelineConfig
from components.data.clean import CleanResult, clean
from components.data.curated import trust_summary
from components.data.ingest import IngestResult, ingest, load_frozen_test
from components.data.live import LiveSet, build_live_set, with_variants
from components.data.split import Continuing, SplitResult, split
from components.model.base_model import BaseModelRef
from components.model.chat import chat_token_counter, load_tokenizer
from components.model.embedding import sentence_embedder
from components.paths import curated_dir
from components.records import Example, content_hash, load_examples, save_examples
from components.registry.tracking import RunLogger
from components.train.recipe import augment_curated
from flows.reports import publish_data_report


@dataclass
class PreparedData:
    ingest: IngestResult
    clean: CleanResult
    split: SplitResult
    live: LiveSet
    stop_path: str | None  # the recipe's early-stopping set, None when it has none
    trust: dict[str, dict[str, int]]  # curated rows by admitting rule; refusals (trust_summary)

    def counts(self) -> dict[str, int]:
        return {
            "ingested": self.ingest.valid,
            "quarantined": self.ingest.quarantined,
            "from_feedback": self.ingest.from_feedback,
            "kept": self.clean.kept,
            "train": self.split.train,
            "validation": self.split.validation,
            "test": self.split.test,
            "live": self.live.size,
            "corrections_new": self.split.corrections_new,
            "corrections_replayed": self.split.corrections_replayed,
            "corrections_known": self.split.corrections_known,
            **{
                f"{side}.{rule}": n
                for side, rules in self.trust.items()
                for rule, n in rules.items()
            },
        }


@dataclass
class Recipe:
    split: SplitResult  # the training split with the curated examples expanded
    held_out: list[Example]  # rewrites for the live set, never trained on
    stop_path: str | None


@task(retries=2, retry_delay_seconds=[2, 10])
def ingest_sources(config: PipelineConfig, out_dir: Path) -> IngestResult:
    return ingest(config.data.sources, out_dir, str(curated_dir(config.data.feedback_dir)))


@task
def clean_examples(
    config: PipelineConfig, ingested: IngestResult, base: BaseModelRef, out_dir: Path
) -> CleanResult:
    count_tokens = chat_token_counter(load_tokenizer(base.path))
    return clean(
        load_examples(Path(ingested.examples_path)),
        config.clean,
        out_dir,
        load_frozen_test(config.data.test_path),
        count_tokens,
    )


@task
def split_examples(
    config: PipelineConfig, cleaned: CleanResult, out_dir: Path, continuing: Continuing | None
) -> SplitResult:
    return split(
        load_examples(Path(cleaned.examples_path)),
        load_frozen_test(config.data.test_path),
        config.data,
        out_dir,
        continuing,
    )


@task
def apply_recipe(
    config: PipelineConfig, splits: SplitResult, out_dir: Path, learned: frozenset[str]
) -> Recipe:
    """Expand the curated examples of the training split by the profile's recipe (those in
    `learned`, replayed, once per epoch), and keep the rewrites it sets aside (the
    early-stopping set as `stop.jsonl`)."""
    from dataclasses import replace

    train = load_examples(Path(splits.train_path))
    if not any(e.origin == "feedback" for e in train):
        return Recipe(splits, [], None)

    embedder = sentence_embedder(config.memory.embedding_model)
    augmented = augment_curated(train, config.recipe, embedder, config.data.seed, learned)
    save_examples(Path(splits.train_path), augmented.train)
    stop_path = None
    if augmented.stop:
        save_examples(out_dir / "stop.jsonl", augmented.stop)
        stop_path = str(out_dir / "stop.jsonl")
    expanded = replace(splits, train=len(augmented.train), train_hash=content_hash(augmented.train))
    return Recipe(expanded, augmented.held_out, stop_path)


@flow(name="data-prep")
def data_prep(
    config: PipelineConfig,
    base: BaseModelRef,
    out_dir: str,
    run_id: str,
    continuing: Continuing | None = None,
) -> PreparedData:
    """Ingest, clean and split; every count goes to MLflow and a Prefect artifact.

    `continuing`: the champion training will continue, if any (see `split`)."""
    folder = Path(out_dir)
    # First, so the trainable rephrasings it curates are ingested with the rest.
    live = task(build_live_set)(config)
    ingested = ingest_sources(config, folder)
    cleaned = clean_examples(config, ingested, base, folder)
    splits = split_examples(config, cleaned, folder, continuing)
    learned = continuing.learned if continuing else frozenset()
    recipe = apply_recipe(config, splits, folder, learned)
    splits = recipe.split
    live = with_variants(config, live, recipe.held_out)

    trust = trust_summary(curated_dir(config.data.feedback_dir))
    prepared = PreparedData(ingested, cleaned, splits, live, recipe.stop_path, trust)
    run = RunLogger(run_id)
    run.metrics(
        {
            **{f"data.{name}": count for name, count in prepared.counts().items()},
            "data.live.corrections": live.corrections,
            "data.live.held_out": live.held_out,
            "data.live.variants": live.variants,
            "data.live.trainable_written": live.trainable_written,
            **{f"clean.removed.{k}": v for k, v in cleaned.removed.items()},
            **{f"clean.pii.{k}": v for k, v in cleaned.pii.items()},
        }
    )
    run.json(
        {
            "ingest": asdict(ingested),
            "clean": asdict(cleaned),
            "split": asdict(splits),
            "live": live.to_dict(),
        },
        "data/report.json",
    )
    # The training prompts are what the monitor compares live prompts with.
    for path in (
        ingested.quarantine_path,
        cleaned.dropped_path,
        splits.train_path,
        splits.learned_path,
    ):
        run.artifact(path, "data")
    if live.path:
        run.artifact(live.path, "data")
    publish_data_report(config.name, ingested, cleaned, splits)
    return prepared
