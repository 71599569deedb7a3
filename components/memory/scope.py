"""When a correction may answer a question: the memory's scope decision.

Corrections come in families that differ in one word (the same setting per site, the same
contact per region), so "a similar question" is not enough: the staging value must not answer
the production question. An entry answers only when all of this holds, and otherwise the memory
abstains with a reason and the model answers:

1. **Candidate.** The question is compared with each entry's correction (sentence embeddings).
   A correction restates what it is about in its own, fixed wording, so siblings differ there
   only in what tells them apart, whatever words the asker chose (a correction that restates
   nothing, a bare value, is compared by its question instead). An entry whose *question* is
   the same (`same_question`) is the candidate without competition.
2. **No competition.** The best correction fits at least `threshold` and better than the
   runner-up by `margin`; otherwise no entry clearly fits, or two compete.
3. **Entity agreement** (for every candidate). Each entry is *about* the words of its question
   that its correction restates (the ward, the site, the setting; not the sentence frame). Its
   *distinguishing* words are those that tell it apart from its family (entries whose
   corrections are similar, `family`), leaving out words most entries share. The question must
   name every distinguishing word, in those words or others (`entity_match`, the similarity of
   the word to a phrase of the question that says no other word of the entry better): a
   question about another site, region, product or setting is another question.
   And every name or number the question uses must be one the entry uses: Sydney is not
   Singapore, and floor 6 is not floor 5, however close their embeddings.
"""

from __future__ import annotations

import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from components.config import MemoryConfig
from components.text import FUNCTION_WORDS

# Never what a question is about: the shared function words, and the rest of a question's frame.
_QUESTION_FRAME = """
    about all also am any anyone anything being but could d did doing done down each every get
    got had has have having he her here hers him his how into just know let like ll m may me
    might mine must my need no nor not off one ones onto ours out over please re really s shall
    she should so some someone something still t tell theirs them there they thing things under
    up us ve very want way what when where which who whom whose why will would yours"""
STOPWORDS = FUNCTION_WORDS | frozenset(_QUESTION_FRAME.split())
_WORD = re.compile(r"[a-z0-9]+(?:[.:,][0-9]+)*")
_RESTATED = 0.8  # a question's word counts as restated by the correction from this similarity
_SHARED_BY = 0.5  # a word in at least this share of the entries tells none apart


def words(text: str) -> list[str]:
    """The lower-case words and numbers of `text` (a decimal or a time stays one word)."""
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def content_words(text: str) -> list[str]:
    """The words that can carry meaning: no function words, no single letters."""
    return [w for w in words(text) if w not in STOPWORDS and len(w) > 1]


def names(text: str) -> list[str]:
    """The proper names and numbers of `text`, lower-cased: capitalised words that do not start
    a sentence, acronyms, and words with digits. Two different names are two different things,
    however similar their embeddings (Sydney and Singapore)."""
    found = []
    for sentence in re.split(r"(?<=[.!?:;])\s+|\n+", text.strip()):
        for i, word in enumerate(re.findall(r"[\w'\u2019]+", sentence)):
            word = re.sub(r"['\u2019]s$", "", word)
            upper = word[:1].isupper() and (i > 0 or (word.isupper() and len(word) > 1))
            if upper or any(c.isdigit() for c in word):
                found += [w for w in words(word) if w not in STOPWORDS]
    return found


def stem(word: str) -> str:
    """A crude English stem, enough to match `orders` with `order` and `listens` with `listen`."""
    for suffix in ("ies", "es", "s", "ing", "ed"):
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def phrases(text: str, longest: int = 3) -> list[str]:
    """Every run of up to `longest` words that neither starts nor ends with a function word:
    what a single word of an entry may be said as (`oncology` as `cancer care unit`)."""
    ws = words(text)
    found = {
        " ".join(ws[i : i + n])
        for n in range(1, longest + 1)
        for i in range(len(ws) - n + 1)
        if ws[i] not in STOPWORDS and ws[i + n - 1] not in STOPWORDS
    }
    return sorted(found)


class PhraseVectors:
    """Embeddings of words and short phrases, the `limit` most recently used kept: questions
    share most of their phrases (the site, the setting), and a bound keeps what users ask from
    growing the process without end."""

    def __init__(self, embedder: Any, limit: int = 20_000) -> None:
        self.embedder = embedder
        self.limit = limit
        self._known: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def of(self, texts: Sequence[str]) -> Any:
        import numpy as np

        with self._lock:  # requests look up from several threads
            missing = sorted({t for t in texts if t not in self._known})
            if missing:
                for text, vector in zip(missing, self.embedder.embed(missing), strict=True):
                    self._known[text] = np.asarray(vector, dtype=np.float32)
            found = []
            for text in texts:
                self._known.move_to_end(text)
                found.append(self._known[text])
            while len(self._known) > self.limit:
                self._known.popitem(last=False)
        return np.stack(found)

    def coverage(
        self, units: Sequence[str], said: Sequence[str], rivals: Sequence[str] = ()
    ) -> Any:
        """For each unit, how closely some phrase of `said` says it (1.0: the same stem). With
        `rivals` (the entry's other words), a phrase counts only for the unit it is closest
        to: "medicine orders" says `pharmacy`, so it cannot also stand for `oncology`."""
        import numpy as np

        if not units:
            return np.ones(0, dtype=np.float32)
        if not said:
            return np.zeros(len(units), dtype=np.float32)
        said_vectors = self.of(said).T
        near = self.of(units) @ said_vectors
        others = [r for r in rivals if r not in units]
        if others:
            rival_best = (self.of(others) @ said_vectors).max(axis=0)
            near = np.where(near >= rival_best, near, 0.0)
        best = near.max(axis=1)
        stems = {stem(w) for phrase in said for w in phrase.split()}
        return np.where([stem(u) in stems for u in units], 1.0, best)


def about(question: str, answer: str, vectors: PhraseVectors) -> list[str]:
    """The words of the question its correction restates: what the entry is about. All the
    question's content words when the correction restates none (a bare value)."""
    asked = sorted(set(content_words(question)))
    restated = vectors.coverage(asked, phrases(answer))
    kept = [w for w, c in zip(asked, restated, strict=True) if c >= _RESTATED]
    return kept or asked


def restates(about_words: Sequence[str], answer: str) -> bool:
    """Whether a correction names, in so many words, something its question is about."""
    said = {stem(w) for w in content_words(answer)}
    return any(stem(w) in said for w in about_words)


@dataclass(frozen=True)
class Family:
    """What tells one entry apart: the words a question must name, and its siblings."""

    distinguishing: list[str]
    siblings: list[int]  # positions of the entries in its family
    about: tuple[str, ...]  # what it is about (the rivals of each distinguishing word)
    mentioned: frozenset[str]  # the stems of every word its question and correction use


def families(
    abouts: Sequence[Sequence[str]],
    texts: Sequence[str],
    fit_vectors: Any,
    config: MemoryConfig,
) -> list[Family]:
    """Each entry's family (entries whose corrections are at least `config.family` similar)
    and its distinguishing words: words it is about that some sibling does not mention, and
    that fewer than half of all entries are about (`ward`, `site` tell no entry apart)."""
    n = len(abouts)
    if n == 0:
        return []
    counts = Counter(stem(w) for ws in abouts for w in set(ws))
    rare = max(2.0, _SHARED_BY * n)
    mentioned = [{stem(w) for w in content_words(t)} for t in texts]
    similar = fit_vectors @ fit_vectors.T
    out = []
    for i, ws in enumerate(abouts):
        siblings = [j for j in range(n) if j != i and similar[i, j] >= config.family]
        specific = [w for w in ws if counts[stem(w)] < rare] or list(ws)
        distinguishing = sorted(
            {w for w in specific for j in siblings if stem(w) not in mentioned[j]}
        )
        out.append(Family(distinguishing, siblings, tuple(ws), frozenset(mentioned[i])))
    return out


@dataclass(frozen=True)
class Verdict:
    """Which entry answers (its position), or None and why the memory abstains."""

    best: int | None
    score: float
    reason: str


def decide(
    question: str,
    question_vector: Any,
    question_vectors: Any,
    fit_vectors: Any,
    kin: Sequence[Family],
    vectors: PhraseVectors,
    config: MemoryConfig,
) -> Verdict:
    """The scope decision for one question over the served entries (see the module's doc)."""
    import numpy as np

    same = np.flatnonzero(question_vectors @ question_vector >= config.same_question)
    if len(same) > 1:
        return Verdict(None, 1.0, f"{len(same)} corrections of the same question compete")
    if len(same) == 1:
        best = int(same[0])
        score, why = float(question_vectors[best] @ question_vector), "same question"
    else:
        fits = fit_vectors @ question_vector
        order = np.argsort(-fits)
        best, score, why = int(order[0]), float(fits[order[0]]), "entities agree"
        if score < config.threshold:
            return Verdict(None, score, f"no correction fits (best {score:.2f})")
        if len(order) > 1 and score - float(fits[order[1]]) < config.margin:
            runner_up = float(fits[order[1]])
            return Verdict(
                None, score, f"two corrections compete ({score:.2f} and {runner_up:.2f})"
            )
    said = phrases(question)
    needed = kin[best].distinguishing
    named = vectors.coverage(needed, said, rivals=kin[best].about)
    missing = [w for w, c in zip(needed, named, strict=True) if c < config.entity_match]
    if missing:
        return Verdict(None, score, f"the question does not name {', '.join(missing)}")
    other = [n for n in names(question) if stem(n) not in kin[best].mentioned]
    if other:
        return Verdict(None, score, f"the question names {', '.join(other)}, the correction not")
    return Verdict(best, score, why)
