"""Training corpora: sentences an LLM wrote, each with the classes it shows.

A corpus is JSONL, one object a line: {"sentence", "labels", "kind"}. Raw LLM
answers carry the classes the question asked about ("requested"); `build_corpus`
turns them into samples with the label rules of method.md section 1.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from imfree.errors import ConfigError
from imfree.fileio import write_atomically
from imfree.toolkit.labels import LabelMatcher

logger = logging.getLogger(__name__)

KINDS = ("appearance", "context", "cooccurrence")


@dataclass(frozen=True)
class Sample:
    sentence: str
    labels: tuple[str, ...]
    kind: str


def read_corpus(path: Path, classes: list[str]) -> list[Sample]:
    """Read a corpus, checking every label against `classes`."""
    known = set(classes)
    samples = []
    for number, record in _read_jsonl(path):
        sentence, labels = record.get("sentence"), record.get("labels")
        if not isinstance(sentence, str) or not sentence.strip():
            raise ConfigError(f"{path}:{number}: needs a non-empty 'sentence' string")
        if not isinstance(labels, list) or not labels:
            raise ConfigError(f"{path}:{number}: needs a non-empty 'labels' list")
        unknown = [repr(label) for label in labels if not isinstance(label, str)
                   or label not in known]
        if unknown:
            raise ConfigError(f"{path}:{number}: unknown class {', '.join(unknown)}; "
                              f"the label set has {', '.join(classes)}")
        samples.append(Sample(sentence, tuple(labels), record.get("kind", "unknown")))
    if not samples:
        raise ConfigError(f"corpus {path} holds no sentences")
    return samples


def write_corpus(path: Path, samples: Iterable[Sample]) -> None:
    """Write atomically: a reader never sees half a corpus."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps(asdict(sample) | {"labels": list(sample.labels)}, ensure_ascii=False) + "\n"
        for sample in samples
    ]
    write_atomically(path, "".join(lines))


def build_corpus(
    answers: Iterable[dict],
    matcher: LabelMatcher,
    token_count: Callable[[str], int],
    context_length: int = 77,
) -> tuple[list[Sample], Counter]:
    """Label raw answers {"sentence", "requested", "kind"}; returns samples and drop counts.

    Labels are the requested classes plus every other class the sentence names.
    Dropped: sentences naming none of their requested classes, sentences too long
    for the text encoder, and repeats.
    """
    order = {info.name: i for i, info in enumerate(matcher.classes)}
    seen: set[str] = set()
    samples, dropped = [], Counter()
    for answer in answers:
        sentence = " ".join(str(answer["sentence"]).split())
        requested = set(answer.get("requested", ()))
        named = set(matcher.match(sentence))

        key = sentence.lower()
        if key in seen:
            dropped["duplicate"] += 1
            continue
        if not requested & named:
            dropped["names none of its requested classes"] += 1
            continue
        if token_count(sentence) + 2 > context_length:  # + start and end tokens
            dropped["longer than the text encoder's context"] += 1
            continue

        seen.add(key)
        labels = tuple(sorted(requested | named, key=order.__getitem__))
        samples.append(Sample(sentence, labels, answer.get("kind", "unknown")))
    return samples, dropped


def corpus_stats(samples: list[Sample], classes: list[str]) -> dict:
    per_class = Counter(label for s in samples for label in s.labels)
    return {
        "sentences": len(samples),
        "by_kind": dict(Counter(s.kind for s in samples)),
        "per_class": {c: per_class.get(c, 0) for c in classes},
        "labels_per_sentence": round(sum(len(s.labels) for s in samples) / max(len(samples), 1), 2),
    }


def clip_token_count(sentence: str) -> int:
    """BPE tokens of CLIP's tokenizer, shared by every OpenAI-style CLIP text tower."""
    from open_clip.tokenizer import _tokenizer

    return len(_tokenizer.encode(sentence))


def _read_jsonl(path: Path) -> Iterable[tuple[int, dict]]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ConfigError(f"cannot read corpus {path}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"corpus {path} is not UTF-8 text: {err.reason}") from err
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"{path}:{number}: not JSON ({err.msg}); fix or delete the line"
            ) from err
        if not isinstance(record, dict):
            raise ConfigError(f"{path}:{number}: each line must be a JSON object")
        yield number, record


def main() -> None:
    """Rebuild a label set's corpus.jsonl from its sentences.jsonl (raw answers)."""
    import sys

    from imfree.errors import ImfreeError
    from imfree.toolkit.labelsets import load_labelset

    try:
        labelset = load_labelset(sys.argv[1] if len(sys.argv) > 1 else "voc2007")
        answers = [record for _, record in _read_jsonl(labelset.folder / "sentences.jsonl")]
        samples, dropped = build_corpus(answers, LabelMatcher(labelset.classes), clip_token_count)
        write_corpus(labelset.corpus_path, samples)
    except ImfreeError as err:
        sys.exit(f"error: {err}")
    stats = corpus_stats(samples, labelset.names)
    print(json.dumps(stats | {"dropped": dict(dropped)}, indent=1))


if __name__ == "__main__":
    main()
