"""BM25 over the documentation passages (bm25s), and the question as the model sees it with
the passages found for it.

The index is built from the profile's `retrieval.corpus` when the service starts (a few
milliseconds for this project's docs). Passages that share a word n-gram with an answer of the
frozen test split are left out, so grounding can never hand the model a test answer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from components.config import PipelineConfig, RetrievalConfig
from components.data.ingest import load_frozen_test
from components.retrieval.corpus import Passage, load_passages
from components.text import NgramOverlap

log = logging.getLogger("flywheel.retrieval")


@dataclass(frozen=True)
class Hit:
    passage: Passage
    score: float

    def source(self) -> dict[str, Any]:
        """What a response says of it: where it comes from and how well it matched."""
        return {"source": self.passage.source, "title": self.passage.title, "score": self.score}


def _tokens(texts: list[str]) -> Any:
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", show_progress=False)


class DocsIndex:
    """BM25 over passages, searched for `top_k` passages scoring above `min_score`;
    `excluded` counts the passages left out for overlapping test answers."""

    def __init__(
        self, passages: list[Passage], top_k: int = 3, min_score: float = 0.0, excluded: int = 0
    ) -> None:
        import bm25s

        if not passages:
            raise ValueError("retrieval.corpus holds no passages")
        self.passages, self.top_k, self.min_score = passages, top_k, min_score
        self.excluded = excluded
        self.bm25 = bm25s.BM25()
        self.bm25.index(_tokens([f"{p.title}\n{p.text}" for p in passages]), show_progress=False)

    def search(self, query: str, k: int | None = None) -> list[Hit]:
        """The `k` (default `top_k`) best passages for `query` that score above `min_score`,
        best first."""
        k = min(k or self.top_k, len(self.passages))
        found, scores = self.bm25.retrieve(_tokens([query]), k=k, show_progress=False)
        return [
            Hit(self.passages[int(i)], round(float(s), 4))
            for i, s in zip(found[0], scores[0], strict=True)
            if float(s) > self.min_score
        ]

    def ground(self, question: str, k: int | None = None) -> tuple[str, list[Hit]]:
        """The question as the model is asked it, with the passages found for it, and those
        passages (the service and the grounding benchmark both ask this way)."""
        hits = self.search(question, k)
        return grounded_question(question, hits), hits


def build_index(config: RetrievalConfig, test_answers: list[str], ngram: int) -> DocsIndex:
    """The index of the corpus, without the passages that overlap a test answer."""
    overlaps = NgramOverlap(test_answers, ngram)
    passages = load_passages(config.corpus, config.passage_chars)
    kept = [p for p in passages if not overlaps(p.text)]
    excluded = len(passages) - len(kept)
    log.info(
        "retrieval index: %d passages from %s, %d left out for overlapping test answers",
        len(kept),
        ", ".join(config.corpus),
        excluded,
    )
    return DocsIndex(kept, config.top_k, config.min_score, excluded)


def profile_index(config: PipelineConfig) -> DocsIndex:
    """`build_index` with the profile's corpus, frozen test split and decontamination n-gram."""
    answers = [e.output for e in load_frozen_test(config.data.test_path)]
    return build_index(config.retrieval, answers, config.clean.decontam_ngram)


def grounded_question(question: str, hits: list[Hit]) -> str:
    """The user's question with the passages found for it, as one user turn."""
    if not hits:
        return question
    passages = "\n\n".join(
        f"[{n}] {hit.passage.title or hit.passage.source}\n{hit.passage.text}"
        for n, hit in enumerate(hits, 1)
    )
    return (
        "Use the documentation below if it helps to answer the question.\n\n"
        f"{passages}\n\nQuestion: {question}"
    )
