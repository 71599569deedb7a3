"""Grounded answers: the docs split into passages, BM25 finding the passage that answers,
passages that overlap a frozen test answer left out, and the real model answering from them."""

from pathlib import Path

import pytest

from components.config import RetrievalConfig
from components.retrieval.corpus import load_passages, split_passages
from components.retrieval.index import DocsIndex, build_index, grounded_question
from components.text import word_list

DOC = """# Guide

Intro paragraph about the guide.

## Deploying

Run the deploy flow to ship a version. It smoke-tests the service first.

```bash
# not a heading: a comment in a code block
make deploy
```

## Staging

The staging MLflow server listens on port 5077. Ask the platform team for access.
"""


def write_docs(folder: Path, text: str = DOC) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "guide.md").write_text(text)
    (folder / "notes.txt").write_text("Release notes: version 2 adds streaming.\n")
    (folder / "image.png").write_bytes(b"\x89PNG")  # not a text file: not in the corpus
    return folder


def test_markdown_sections_become_passages_under_their_headings() -> None:
    passages = split_passages(DOC, "guide.md", max_chars=700)
    assert [p.title for p in passages] == ["Guide", "Guide > Deploying", "Guide > Staging"]
    deploying = passages[1].text
    assert "# not a heading" in deploying and "make deploy" in deploying  # the code block stays


def test_a_long_section_is_split_without_losing_a_word() -> None:
    long = "# Long\n\n" + " ".join(f"Sentence number {i} says something." for i in range(60))
    long += "\n\nhttps://example.org/" + "x" * 300  # one word longer than a passage
    passages = split_passages(long, "long.md", max_chars=200)
    assert len(passages) > 5 and all(len(p.text) <= 200 for p in passages)
    assert "".join(word_list(" ".join(p.text for p in passages))) == "".join(
        word_list(long.removeprefix("# Long"))
    )


def test_the_corpus_takes_files_and_folders_and_names_what_is_missing(tmp_path: Path) -> None:
    docs = write_docs(tmp_path / "docs")
    sources = {Path(p.source).name for p in load_passages([str(docs)], 700)}
    assert sources == {"guide.md", "notes.txt"}
    with pytest.raises(FileNotFoundError, match=r"retrieval\.corpus: no file or folder .*nowhere"):
        load_passages([str(tmp_path / "nowhere")], 700)


def test_an_enabled_profile_with_a_missing_corpus_is_refused(tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="corpus: no file or folder"):
        RetrievalConfig(enabled=True, corpus=[str(tmp_path / "none")])
    assert RetrievalConfig(enabled=False, corpus=[str(tmp_path / "none")])  # unused: fine


def test_bm25_finds_the_passage_that_answers(tmp_path: Path) -> None:
    index = build_index(RetrievalConfig(corpus=[str(write_docs(tmp_path))]), [], 10)
    [best, *_] = index.search("Which port does the staging MLflow server use?", k=2)
    assert best.passage.title == "Guide > Staging"
    assert best.source() == {
        "source": best.passage.source,
        "title": "Guide > Staging",
        "score": best.score,
    }
    assert index.search("zebra quantum", k=3) == []  # nothing scores: nothing given
    assert len(index.search("deploy", k=50)) <= len(index.passages)


def test_passages_that_overlap_a_test_answer_are_left_out(tmp_path: Path) -> None:
    docs = write_docs(tmp_path)
    answer = "The staging MLflow server listens on port 5077. Ask the platform team for access."
    index = build_index(RetrievalConfig(corpus=[str(docs)]), [answer], 10)
    assert index.excluded == 1
    assert all("5077" not in p.text for p in index.passages)


def test_the_shipped_corpus_holds_no_frozen_test_answer() -> None:
    from components.config import load_profile
    from components.data.ingest import load_frozen_test
    from components.retrieval.index import profile_index
    from components.text import normalize_text

    config = load_profile("cpu-small")
    index = profile_index(config)
    answers = [normalize_text(e.output) for e in load_frozen_test(config.data.test_path)]
    corpus = normalize_text("\n".join(p.text for p in index.passages))
    assert len(index.passages) > 50
    assert [a for a in answers if a in corpus] == []


def test_an_empty_corpus_is_an_error() -> None:
    with pytest.raises(ValueError, match="no passages"):
        DocsIndex([])


def test_the_grounded_question_carries_the_passages_and_the_question(tmp_path: Path) -> None:
    index = build_index(RetrievalConfig(corpus=[str(write_docs(tmp_path))]), [], 10)
    grounded, hits = index.ground("staging MLflow port", k=1)
    assert [h.passage.title for h in hits] == ["Guide > Staging"]
    assert "[1] Guide > Staging" in grounded and "5077" in grounded
    assert grounded.endswith("Question: staging MLflow port")
    grounded = grounded_question("Which port?", hits)
    assert grounded.endswith("Question: Which port?")
    assert grounded_question("Which port?", []) == "Which port?"


@pytest.mark.slow
def test_grounding_lets_the_real_model_answer_from_the_docs(tmp_path: Path) -> None:
    """SmolLM2 cannot know a made-up fact; given the passage that states it, it says it."""
    from components.config import ModelConfig
    from components.model.base_model import resolve_base_model
    from components.model.generation import generate_chat, load_for_inference

    index = build_index(RetrievalConfig(corpus=[str(write_docs(tmp_path))]), [], 10)
    question = "Which port does the staging MLflow server listen on?"
    model, tokenizer = load_for_inference(resolve_base_model(ModelConfig()).path)
    plain, grounded = generate_chat(
        model,
        tokenizer,
        [
            [{"role": "user", "content": question}],
            [{"role": "user", "content": index.ground(question, 2)[0]}],
        ],
        max_new_tokens=40,
    )
    assert "5077" in grounded.text, grounded.text
    assert "5077" not in plain.text, plain.text
