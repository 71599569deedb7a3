from collections import Counter
from pathlib import Path

import pytest

from components.config import CleanConfig
from components.data.clean import FILTERS, clean
from components.model.chat import chat_token_counter
from components.records import Example, read_jsonl
from components.text import Decontaminator, luhn_valid, normalize_text, scrub_pii


def ex(instruction: str, output: str = "An answer that is long enough.") -> Example:
    return Example(instruction=instruction, output=output)


def test_normalize_text() -> None:
    assert normalize_text("  Caf\u00e9\u200b  \r\nok\t\n\n\n\nend  ") == "Café\nok\n\nend"
    assert normalize_text("\uff21\uff22") == "AB"  # NFKC folds full-width letters
    assert normalize_text("code:\n    make test") == "code:\n    make test"


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("write to jane.doe@example.com today", "email"),
        ("call +1 415 555 0132 now", "phone"),
        ("call (212) 555-0187 now", "phone"),
        ("server 10.20.30.40 is down", "ip"),
        ("card 4111 1111 1111 1111 paid", "card"),
    ],
)
def test_pii_is_scrubbed_and_counted(text: str, kind: str) -> None:
    counts: Counter[str] = Counter()
    scrubbed = scrub_pii(text, counts)
    assert f"[{kind.upper()}]" in scrubbed
    assert counts == Counter({kind: 1})


@pytest.mark.parametrize(
    "text",
    [
        "torch 2.13.0 and fastapi 0.150.0",
        "open http://127.0.0.1:4200",
        "seed 1234, 517 MB",
    ],
)
def test_pii_leaves_ordinary_numbers_alone(text: str) -> None:
    counts: Counter[str] = Counter()
    assert scrub_pii(text, counts) == text
    assert not counts


def test_luhn() -> None:
    assert luhn_valid("4111111111111111")
    assert not luhn_valid("4111111111111112")


def test_decontamination_uses_ngrams_and_short_prompts() -> None:
    test = [
        ex("What does the retrain cooldown do in a Flywheel profile when drift is high?"),
        ex("What is QLoRA?"),
    ]
    flag = Decontaminator(test, n=8)
    assert flag(ex("Tell me: what does the retrain cooldown do in a Flywheel profile?"))
    assert flag(ex("what is  QLoRA?"))
    assert not flag(ex("What is LoRA?"))
    assert not flag(ex("How do I start the Prefect server on my laptop today?"))


def test_clean_runs_every_filter_and_reports(tmp_path: Path, tokenizer) -> None:
    examples = [
        ex("How do I serve the champion?", "Run make serve; it starts bentoml serve."),
        ex("How do I serve the champion?", "Run make serve; it starts bentoml serve."),  # exact
        ex("how do I serve the   champion?", "Run make serve; it starts bentoml serve."),  # exact
        ex("Hi there", "== 12.5 / 99.1 :: 0.126 == 44.0 %% 7.7 -> 3.14 ## 2.71"),  # letters
        ex("??", ""),  # too short
        ex("What is QLoRA?", "LoRA adapters on a 4-bit base."),  # overlaps test
        ex(
            "Explain adaptive batching in the Flywheel service in detail please",
            "It groups concurrent requests into one generate call, raising throughput on CPU "
            "several times; the batch sizes appear in /metrics.",
        ),
        ex(
            "Explain adaptive batching in the Flywheel service in detail, thanks!",
            "It groups concurrent requests into one generate call, raising throughput on CPU "
            "several times; the batch sizes appear in /metrics.",
        ),  # near duplicate
        ex("Write a long answer", "word " * 400),  # too long
        ex("My email is bob@example.org, why does ingest fail?", "Look at the quarantine file."),
        ex("Why is the worker down?", "Because you are a fucking idiot who broke it."),  # toxic
        ex("How do I kill a stuck worker?", "Kill its process with SIGKILL, then restart it."),
    ]
    config = CleanConfig(max_tokens=200, near_dup_threshold=0.6)
    result = clean(
        examples, config, tmp_path, [ex("What is QLoRA?")], chat_token_counter(tokenizer)
    )

    assert result.removed == {
        "profane": 1,
        "too_short": 1,
        "low_letter_ratio": 1,
        "exact_duplicate": 2,
        "test_overlap": 1,
        "near_duplicate": 1,
        "too_long": 1,
    }
    assert list(result.removed) == list(FILTERS)
    assert result.kept == 4  # "kill" and "stuck" in a technical answer are not toxic
    assert result.pii["email"] == 1
    kept = read_jsonl(Path(result.examples_path))
    assert "[EMAIL]" in kept[-2]["instruction"] and "SIGKILL" in kept[-1]["output"]
    dropped = read_jsonl(Path(result.dropped_path))
    assert len(dropped) == sum(result.removed.values())  # nothing disappears unaccounted
    assert {row["filter"] for row in dropped} == set(FILTERS)


def test_seed_data_is_large_enough_and_clean(tmp_path: Path, tokenizer, tiny_config) -> None:
    """The data suite: the shipped seed data meets its promises after the real cleaning."""
    from components.data.ingest import ingest, load_frozen_test
    from components.records import load_examples

    ingested = ingest(tiny_config.data.sources, tmp_path / "in")
    assert ingested.quarantined == 0
    test = load_frozen_test(tiny_config.data.test_path)
    assert len(test) >= 100
    result = clean(
        load_examples(Path(ingested.examples_path)),
        tiny_config.clean,
        tmp_path,
        test,
        chat_token_counter(tokenizer),
    )
    assert result.kept >= 600
    assert result.removed["test_overlap"] == 0  # the test split was written apart from training
    assert result.pii["email"] >= 1 and result.pii["card"] >= 1
    drift = read_jsonl(Path(__file__).parents[1] / "data" / "seed" / "drift_prompts.jsonl")
    assert len(drift) >= 60
    flag = Decontaminator(load_examples(Path(result.examples_path)), n=4)
    assert sum(flag(Example(instruction=d["prompt"], output="")) for d in drift) == 0
