"""The bundled voc2007 label set: classes, tree, and a corpus that can be rebuilt."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from imfree.toolkit.corpus import KINDS, build_corpus, clip_token_count, read_corpus
from imfree.toolkit.labels import LabelMatcher
from imfree.toolkit.labelsets import bundled_labelsets, load_labelset

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]


@pytest.fixture(scope="module")
def voc():
    return load_labelset("voc2007")


@pytest.fixture(scope="module")
def corpus_records(voc):
    lines = voc.corpus_path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def samples(voc):
    return read_corpus(voc.corpus_path, voc.names)  # checks every label is a class


def test_voc2007_is_bundled():
    assert "voc2007" in bundled_labelsets()


def test_twenty_classes(voc):
    assert sorted(voc.names) == VOC_CLASSES


def test_every_class_has_a_prompt_name(voc):
    assert all(c.prompt_name.strip() for c in voc.classes)


def test_hierarchy_has_nine_fine_and_five_coarse_groups(voc):
    assert len(voc.hierarchy.fine_names) == 9
    assert len(voc.hierarchy.coarse_names) == 5


def test_hierarchy_follows_the_authors_tree(voc):
    fine = {frozenset(members) for members in voc.hierarchy.to_dict()["fine"].values()}
    assert frozenset({"tvmonitor", "cat", "sofa"}) in fine
    assert frozenset({"train", "bus", "motorbike", "bicycle"}) in fine
    assert frozenset({"sheep", "cow"}) in fine


def test_corpus_size(samples):
    assert len(samples) >= 1500


def test_corpus_has_all_three_kinds(samples):
    assert set(KINDS) <= {s.kind for s in samples}


def test_every_class_in_at_least_30_sentences(samples, voc):
    per_class = Counter(label for s in samples for label in s.labels)
    thin = {c: per_class[c] for c in voc.names if per_class[c] < 30}
    assert not thin, f"classes in fewer than 30 sentences: {thin}"


def test_no_duplicate_sentences(samples):
    keys = Counter(" ".join(s.sentence.lower().split()) for s in samples)
    repeated = [k for k, n in keys.items() if n > 1]
    assert not repeated, repeated[:5]


def test_labels_are_unique_within_a_sentence(samples):
    assert all(len(set(s.labels)) == len(s.labels) for s in samples)


def test_every_sentence_fits_the_text_encoder(samples):
    too_long = [s.sentence for s in samples if clip_token_count(s.sentence) > 75]
    assert not too_long, too_long[:3]


def test_corpus_is_reproducible_from_raw_sentences(voc, corpus_records):
    raw_path = voc.folder / "sentences.jsonl"
    answers = [json.loads(line) for line in raw_path.read_text(encoding="utf-8").splitlines()
               if line.strip()]
    assert all("requested" in a for a in answers)

    rebuilt, _ = build_corpus(answers, LabelMatcher(voc.classes), clip_token_count)
    expected = [{"sentence": s.sentence, "labels": list(s.labels), "kind": s.kind}
                for s in rebuilt]
    assert corpus_records == expected
