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

    def match(self, sentence: str) -> list[str]:
        """Class names mentioned (and not negated) in `sentence`, in class order."""
        text = sentence.lower()
        return [
            info.name
            for info, pattern in zip(self.classes, self._patterns, strict=False)
            if any(not self._negated(text, m.start()) for m in pattern.finditer(text))
        ]

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
