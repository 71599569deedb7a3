"""Text helpers shared by cleaning, curation and the service: normalisation, PII scrubbing,
word n-grams and test-split decontamination."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable

from components.records import Example

_INVISIBLE = dict.fromkeys(
    [c for c in range(0x20) if c not in (0x09, 0x0A)] + [0x7F, 0x200B, 0x200C, 0x200D, 0xFEFF]
)
_WORD = re.compile(r"\w+", re.UNICODE)

_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b")
_CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
_IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")
_PHONE = re.compile(
    r"(?<![\w.])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)|\d{2,4})[ .-]\d{3,4}[ .-]\d{3,4}\b"
)


def normalize_text(text: str) -> str:
    """NFKC, no control or zero-width characters, tidy whitespace; indentation is kept."""
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = text.translate(_INVISIBLE).replace("\t", "    ")
    lines = [line.rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def question_key(text: str) -> str:
    """A question as compared for sameness: lower case, whitespace collapsed."""
    return " ".join(text.lower().split())


def luhn_valid(digits: str) -> bool:
    """The card-number checksum: avoids scrubbing ordinary long numbers."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def scrub_pii(text: str, counts: Counter[str]) -> str:
    """Replace emails, card numbers, IP addresses and phone numbers; count each kind."""

    def sub(
        pattern: re.Pattern[str],
        kind: str,
        text: str,
        accept: Callable[[str], bool] = lambda _: True,
    ) -> str:
        def repl(match: re.Match[str]) -> str:
            if not accept(match.group(0)):
                return match.group(0)
            counts[kind] += 1
            return f"[{kind.upper()}]"

        return pattern.sub(repl, text)

    text = sub(_EMAIL, "email", text)
    text = sub(_CARD, "card", text, lambda m: luhn_valid(re.sub(r"\D", "", m)))
    # Loopback and wildcard addresses appear in instructions ("open 127.0.0.1:4200"), not PII.
    text = sub(_IPV4, "ip", text, lambda m: not m.startswith(("127.", "0.0.0.0")))
    return sub(_PHONE, "phone", text, lambda m: len(re.sub(r"\D", "", m)) >= 9)


# Words that carry no fact: a few articles, pronouns, auxiliaries and prepositions.
_FUNCTION_WORDS = (
    "a an the is are was were be been of to in on at for by with and or it its this that "
    "these those as from you your we our their can do does i if then than"
)
FUNCTION_WORDS = frozenset(_FUNCTION_WORDS.split())


def word_list(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


class NgramOverlap:
    """Flags texts that share a word n-gram with any of `texts`, or (for texts shorter than
    n words) equal one after normalisation."""

    def __init__(self, texts: Iterable[str], n: int) -> None:
        self.n = n
        self.grams: set[tuple[str, ...]] = set()
        self.short: set[tuple[str, ...]] = set()
        for text in texts:
            words = word_list(text)
            self.grams |= ngrams(words, n)
            self.short.add(tuple(words))

    def __call__(self, text: str) -> bool:
        words = word_list(text)
        if len(words) < self.n:
            return tuple(words) in self.short
        return not self.grams.isdisjoint(ngrams(words, self.n))


class Decontaminator:
    """Flags training prompts that overlap the frozen test prompts (an `NgramOverlap`)."""

    def __init__(self, test_examples: Iterable[Example], n: int) -> None:
        self.overlap = NgramOverlap((e.prompt() for e in test_examples), n)

    def __call__(self, example: Example) -> bool:
        return self.overlap(example.prompt())
