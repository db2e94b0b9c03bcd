"""Check a corpus and describe it: `imfree knowledge validate`.

Beyond what reading a corpus already checks (JSON lines, known labels), a
corpus passes when it has no repeats, no sentence too long for CLIP's text
encoder, no sentence naming a class missing from its labels, and enough
sentences per class: on average at least `min_mean`, each class at least
`min_per_class`.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imfree.toolkit.corpus import clip_token_count, corpus_stats, read_corpus
from imfree.toolkit.labels import LabelMatcher
from imfree.toolkit.labelsets import load_labelset

CONTEXT_LENGTH = 77


@dataclass
class ValidationReport:
    corpus: Path
    stats: dict[str, Any]
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        s = self.stats
        per_class = s["per_class"]
        thinnest = sorted(per_class.items(), key=lambda item: item[1])[:5]
        kinds = ", ".join(f"{kind} {n}" for kind, n in s["by_kind"].items())
        lines = [
            f"corpus: {self.corpus}",
            f"sentences: {s['sentences']} ({kinds})",
            f"classes: {len(per_class)}; sentences per class: mean {s['mean_per_class']}, "
            f"median {s['median_per_class']}, min {s['min_per_class']}, max {s['max_per_class']}",
            f"thinnest: {', '.join(f'{c} {n}' for c, n in thinnest)}",
            f"labels per sentence: {s['labels_per_sentence']}; words per sentence: mean "
            f"{s['mean_words']}; CLIP tokens: max {s['max_tokens']}",
        ]
        lines += [f"problem: {p}" for p in self.problems]
        lines.append("passed" if self.passed else f"failed: {len(self.problems)} problem(s)")
        return lines


def validate_corpus(
    spec: str | Path, labels: str | None = None, min_mean: float = 100, min_per_class: int = 30
) -> ValidationReport:
    """Validate a corpus given as a path, a label-set folder or a bundled name."""
    labelset = load_labelset(labels or spec)
    corpus = Path(spec) if labels else labelset.corpus_path
    samples = read_corpus(corpus, labelset.names)
    matcher = LabelMatcher(labelset.classes)

    stats = corpus_stats(samples, labelset.names)
    counts = list(stats["per_class"].values())
    tokens = [clip_token_count(s.sentence) for s in samples]
    stats |= {
        "mean_per_class": round(statistics.fmean(counts), 1),
        "median_per_class": statistics.median(counts),
        "min_per_class": min(counts),
        "max_per_class": max(counts),
        "mean_words": round(statistics.fmean(len(s.sentence.split()) for s in samples), 1),
        "max_tokens": max(tokens),
    }
    report = ValidationReport(corpus, stats)

    repeats = [k for k, n in Counter(" ".join(s.sentence.lower().split())
                                     for s in samples).items() if n > 1]
    if repeats:
        report.problems.append(f"{len(repeats)} sentence(s) repeated, e.g. {repeats[0]!r}")
    too_long = sum(t + 2 > CONTEXT_LENGTH for t in tokens)
    if too_long:
        report.problems.append(f"{too_long} sentence(s) longer than CLIP's {CONTEXT_LENGTH} "
                               f"tokens")
    unlabelled = [s for s in samples if set(matcher.match(s.sentence)) - set(s.labels)]
    if unlabelled:
        report.problems.append(
            f"{len(unlabelled)} sentence(s) name a class missing from their labels, e.g. "
            f"{unlabelled[0].sentence!r}; rebuild the corpus with the label matcher")
    if stats["mean_per_class"] < min_mean:
        report.problems.append(f"{stats['mean_per_class']} sentences per class on average; "
                               f"at least {min_mean:g} wanted")
    thin = {c: n for c, n in stats["per_class"].items() if n < min_per_class}
    if thin:
        listed = ", ".join(f"{c} ({n})" for c, n in sorted(thin.items(), key=lambda i: i[1]))
        report.problems.append(f"{len(thin)} class(es) in fewer than {min_per_class} "
                               f"sentences: {listed}")
    return report
