"""What "in domain" means, written once for the router and the drift check: a prompt is in
the champion's domain when its sentence embedding (the correction memory's all-MiniLM-L6-v2)
is at least `min_similarity` (cosine) close to one of the champion's training prompts.

The drift check's TF-IDF classifier tells a whole window of live prompts from the training
prompts; a router must judge one prompt at a time, where TF-IDF nearest neighbours are fooled
by the shape of a question ("How do I ...") and embeddings are not (docs/serving.md: routing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from components.text import normalize_text


@dataclass(frozen=True)
class DomainVerdict:
    in_domain: bool
    similarity: float  # to the nearest training prompt


class DomainModel:
    """The champion's training prompts, embedded once; judges prompts against them."""

    def __init__(self, reference: list[str], embedder: Any, min_similarity: float) -> None:
        if not reference:
            raise ValueError("the domain needs the champion's training prompts; none were given")
        self.embedder, self.min_similarity = embedder, min_similarity
        self.vectors = embedder.embed([normalize_text(p) for p in reference])
        self.size = len(reference)

    def similarities(self, prompts: list[str]) -> Any:
        """Each prompt's cosine similarity to its nearest training prompt."""
        queries = self.embedder.embed([normalize_text(p) for p in prompts])
        return (queries @ self.vectors.T).max(axis=1)

    def judge(self, prompt: str) -> DomainVerdict:
        similarity = float(self.similarities([prompt])[0])
        return DomainVerdict(similarity >= self.min_similarity, round(similarity, 4))

    def out_of_domain_share(self, prompts: list[str]) -> float:
        """The share of `prompts` the router would send away from the champion."""
        if not prompts:
            return 0.0
        return float((self.similarities(prompts) < self.min_similarity).mean())
