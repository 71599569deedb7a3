from pathlib import Path

from components.config import DataConfig, SourceConfig
from components.data.split import Continuing, assign_validation, split
from components.records import Example, load_examples


def _examples(n: int, prefix: str = "q") -> list[Example]:
    return [Example(instruction=f"{prefix} {i}?", output=f"answer {i}") for i in range(n)]


def test_split_is_stable_when_data_grows(tmp_path: Path) -> None:
    config = DataConfig(sources=[SourceConfig(path="x.jsonl")], validation_fraction=0.2)
    test = _examples(5, "test")
    first = split(_examples(200), test, config, tmp_path / "a")
    grown = split(_examples(200) + _examples(100, "new"), test, config, tmp_path / "b")

    val_a = {e.instruction for e in load_examples(Path(first.validation_path))}
    val_b = {e.instruction for e in load_examples(Path(grown.validation_path))}
    assert val_a and val_a <= val_b  # old examples never move between splits
    assert 20 <= first.validation <= 60
    assert first.test == grown.test == 5 and first.test_hash == grown.test_hash


def test_max_train_examples_caps_training(tmp_path: Path) -> None:
    config = DataConfig(sources=[SourceConfig(path="x.jsonl")], max_train_examples=10)
    result = split(_examples(100), _examples(3, "t"), config, tmp_path)
    assert result.train == 10


def test_the_cap_keeps_every_feedback_example(tmp_path: Path) -> None:
    from dataclasses import replace

    config = DataConfig(sources=[SourceConfig(path="x.jsonl")], max_train_examples=10)
    examples = _examples(100)
    taught = [replace(e, origin="feedback") for e in _examples(4, "fb")]
    result = split(examples + taught, _examples(3, "t"), config, tmp_path)
    kept = load_examples(Path(result.train_path))
    assert len(kept) == 10
    assert sum(e.origin == "feedback" for e in kept) == 4 - sum(
        assign_validation(e, config.validation_fraction, config.seed) for e in taught
    )


def _taught(n: int, prefix: str) -> list[Example]:
    from dataclasses import replace

    config = DataConfig(sources=[SourceConfig(path="x.jsonl")])
    taught = [replace(e, origin="feedback") for e in _examples(n, prefix)]
    return [e for e in taught if not assign_validation(e, config.validation_fraction, config.seed)]


def test_a_continuing_run_trains_on_what_is_new_and_a_bounded_replay(tmp_path: Path) -> None:
    import json

    config = DataConfig(sources=[SourceConfig(path="x.jsonl")], max_train_examples=40)
    old, new = _taught(30, "old"), _taught(6, "new")
    first = split(_examples(100) + old, [], config, tmp_path / "v1")
    learned = frozenset(json.loads(Path(first.learned_path).read_text()))
    assert learned == {e.key() for e in old} and first.corrections_new == len(old)

    continuing = Continuing("1", learned, replay=5)
    second = split(_examples(100) + old + new, [], config, tmp_path / "v2", continuing)
    trained = load_examples(Path(second.train_path))
    replayed = [e for e in trained if e.key() in learned]
    assert {e for e in trained if e.origin == "feedback"} - set(replayed) == set(new)
    assert len(replayed) == second.corrections_replayed == 5
    assert (second.corrections_new, second.corrections_known) == (len(new), len(old))
    assert len(trained) == 40  # the seed sample fills what the corrections leave
    # the weights it produces learned the old ones (carried by the adapter) and the new
    assert set(json.loads(Path(second.learned_path).read_text())) == learned | {
        e.key() for e in new
    }
    # another champion replays another sample, so over retrains every old one comes back
    third = split(
        _examples(100) + old + new, [], config, tmp_path / "v3", Continuing("2", learned, 5)
    )
    assert {e for e in load_examples(Path(third.train_path)) if e.key() in learned} != set(replayed)


def test_curated_data_is_state_under_the_home(home: Path, monkeypatch) -> None:
    from components.paths import curated_dir

    monkeypatch.delenv("FLYWHEEL_CURATED_DIR")
    assert curated_dir(None) == home / "curated"  # `make clean` removes it with the rest
    assert curated_dir("/data/reviews") == Path("/data/reviews")
    monkeypatch.setenv("FLYWHEEL_CURATED_DIR", str(home / "elsewhere"))
    assert curated_dir("/data/reviews") == home / "elsewhere"


def test_the_fine_tune_folder_follows_only_what_changes_the_weights(home: Path) -> None:
    from components.config import load_profile
    from flows.finetuning import Start
    from flows.training_pipeline import finetune_dir

    config = load_profile("tiny")
    same = [
        load_profile("tiny", ["serve.port=3999"]),
        load_profile("tiny", ["monitor.cooldown_minutes=5"]),
        load_profile("tiny", ["eval.max_examples=3"]),
    ]
    assert {finetune_dir(c, "data1") for c in [config, *same]} == {finetune_dir(config, "data1")}
    different = [
        load_profile("tiny", ["train.learning_rate=0.5"]),
        load_profile("tiny", ["lora.r=2"]),
        load_profile("tiny", ["model.base_model=other"]),
    ]
    folders = {finetune_dir(c, "data1") for c in different} | {finetune_dir(config, "data2")}
    folders |= {finetune_dir(config, "data1", Start(v, "adapter")) for v in ("1", "2")}
    assert finetune_dir(config, "data1") not in folders and len(folders) == 6
