"""Import corpora in the `sentence#####label#####label` format earlier work published.

Each line is a sentence followed by its labels, separated by five `#`. Labels are
mapped to the label set's classes by name, synonym or plural; the sentence then
goes through the same label rules as an LLM's answer (the labels given count as
the requested classes), unless `as_is` keeps the given labels unchanged.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imfree.errors import ConfigError
from imfree.toolkit.corpus import Sample, build_corpus, clip_token_count, corpus_stats
from imfree.toolkit.labels import LabelMatcher
from imfree.toolkit.labelsets import load_labelset

logger = logging.getLogger(__name__)

SEPARATOR = "#####"
UNKNOWN = "labels outside the label set"


@dataclass
class ImportSummary:
    out: Path
    lines: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    unknown_labels: Counter = field(default_factory=Counter)
    stats: dict[str, Any] = field(default_factory=dict)


def import_sentences(
    path: Path, labels: str, out: Path, as_is: bool = False
) -> ImportSummary:
    """Write the label-set folder `out` from a `sentence#####label...` file."""
    from imfree.toolkit.knowledge.runner import write_labelset_folder

    labelset = load_labelset(labels)
    matcher = LabelMatcher(labelset.classes)
    summary = ImportSummary(out=Path(out))
    records = _read(Path(path), matcher, summary)

    if as_is:
        order = {name: i for i, name in enumerate(labelset.names)}
        samples = [Sample(" ".join(r["sentence"].split()), tuple(sorted(
            r["requested"], key=order.__getitem__)), "imported") for r in records]
    else:
        samples, dropped = build_corpus(records, matcher, clip_token_count)
        summary.dropped.update(dropped)
    if not samples:
        raise ConfigError(f"no sentence of {path} could be labelled with {labels}'s classes; "
                          f"check that its labels are class names")
    summary.kept = len(samples)
    summary.stats = corpus_stats(samples, labelset.names)
    write_labelset_folder(Path(out), labelset.classes, labelset.hierarchy, records, samples,
                          {"imported_from": str(path), "as_is": as_is})
    return summary


def _read(path: Path, matcher: LabelMatcher, summary: ImportSummary) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from err

    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        summary.lines += 1
        sentence, *given = line.split(SEPARATOR)
        if not sentence.strip() or not given:
            raise ConfigError(f"{path}:{number}: expected 'sentence#####label#####label', "
                              f"got {line[:80]!r}")
        requested = []
        for label in given:
            key = matcher.resolve(label)
            if key is None:
                summary.unknown_labels[label.strip()] += 1
            elif key not in requested:
                requested.append(key)
        if not requested:
            summary.dropped[UNKNOWN] += 1
            continue
        records.append({"sentence": sentence.strip(), "requested": requested,
                        "kind": "imported"})
    return records
