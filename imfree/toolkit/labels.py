"""Which classes a sentence names.

A class is named by its key, its prompt name, a synonym, or a plural of any of
these, matched on word boundaries ("cat" is not in "catch"). A mention right
after a negation ("no dogs", "without a car") does not count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NEGATIONS = ("no", "not", "without", "never", "nor", "neither", "none", "zero")
# How many words may stand between a negation and the class it negates
# ("no big brown dogs"): a few adjectives, no more.
NEGATION_REACH = 3
SCOPE_BREAKS = ("and", "but", "with", "near", "next", "beside", "behind", "from", "by",
                "while", "under", "above", "on", "in", "at")


@dataclass(frozen=True)
class ClassInfo:
    name: str
    prompt_name: str
    synonyms: tuple[str, ...] = ()

    def phrases(self) -> set[str]:
        words = {self.name, self.prompt_name, *self.synonyms}
        return {" ".join(w.lower().split()) for w in words if w.strip()}


def plural_forms(phrase: str) -> set[str]:
    """Regular English plurals of a phrase's last word; irregulars come as synonyms."""
    *head, last = phrase.split(" ")
    forms = {last + "s"}
    if re.search(r"(s|x|z|ch|sh)$", last):
        forms = {last + "es"}
    elif re.search(r"[^aeiou]y$", last):
        forms = {last[:-1] + "ies"}
    elif last.endswith("fe"):
        forms |= {last[:-2] + "ves"}
    elif last.endswith("f"):
        forms |= {last[:-1] + "ves"}
    return {" ".join([*head, form]) for form in forms}


class LabelMatcher:
    """Finds the classes a sentence names, negated mentions excluded."""

    def __init__(self, classes: list[ClassInfo]) -> None:
        self.classes = classes
        self._patterns = [self._pattern(info) for info in classes]
        # Words between a negation and its class are adjectives or articles; a
        # preposition or conjunction ends the negation's reach ("not far from a car").
        between = r"(?:\s+(?!(?:" + "|".join(SCOPE_BREAKS) + r")\b)[\w'-]+)"
        self._negation = re.compile(
            r"\b(?:" + "|".join(NEGATIONS) + r")\b" + between
            + "{0," + str(NEGATION_REACH) + r"}\s*$"
        )

    def resolve(self, phrase: str) -> str | None:
        """The class a bare name stands for ("Dogs", "tv monitor", a synonym), or None."""
        text = " ".join(phrase.lower().replace("-", " ").split())
        if not text:
            return None
        for info, pattern in zip(self.classes, self._patterns, strict=False):
            found = pattern.fullmatch(text)
            if found:
                return info.name
        return None

    def match(self, sentence: str) -> list[str]:
        """Class names mentioned (and not negated) in `sentence`, in class order.

        A mention inside a longer mention of another class is part of that
        class's name, not a mention of its own: "hot dog" is no dog, "teddy
        bear" no bear.
        """
        text = sentence.lower()
        mentions = [
            (found.start(), found.end(), index)
            for index, pattern in enumerate(self._patterns)
            for found in pattern.finditer(text)
        ]
        named = {
            index
            for start, end, index in mentions
            if not _inside_longer(start, end, index, mentions) and not self._negated(text, start)
        }
        return [self.classes[index].name for index in sorted(named)]

    def _negated(self, text: str, start: int) -> bool:
        # Only the words since the last clause break can negate this mention.
        before = re.split(r"[.,;:!?()]", text[:start])[-1]
        return bool(self._negation.search(before))

    @staticmethod
    def _pattern(info: ClassInfo) -> re.Pattern[str]:
        phrases = set()
        for phrase in info.phrases():
            phrases |= {phrase} | plural_forms(phrase)
        # Longest first so "dining table" wins over "table"; spaces match any
        # run of whitespace or a hyphen ("tv-monitor", "potted  plant").
        alternatives = [
            r"[\s-]+".join(re.escape(w) for w in p.split(" "))
            for p in sorted(phrases, key=len, reverse=True)
        ]
        return re.compile(r"(?<![\w-])(?:" + "|".join(alternatives) + r")(?![\w-])")


def _inside_longer(start: int, end: int, index: int, mentions: list[tuple[int, int, int]]) -> bool:
    return any(
        other != index and s <= start and end <= e and e - s > end - start
        for s, e, other in mentions
    )
