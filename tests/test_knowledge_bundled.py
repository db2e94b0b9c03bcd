"""The bundled COCO and NUS-WIDE label sets: classes, trees, corpora that pass validation."""

from __future__ import annotations

import json

import pytest

from imfree.toolkit.corpus import build_corpus, clip_token_count
from imfree.toolkit.knowledge import KnowledgeConfig, run_knowledge, validate_corpus
from imfree.toolkit.labels import LabelMatcher
from imfree.toolkit.labelsets import bundled_labelsets, load_labelset

COUNTS = {"coco2014": (80, 20, 9), "nuswide": (81, 20, 8)}


@pytest.fixture(scope="module", params=sorted(COUNTS))
def bundled(request):
    return load_labelset(request.param)


def test_bundled_sets_are_listed():
    assert {"voc2007", "coco2014", "nuswide"} <= set(bundled_labelsets())


def test_classes_in_the_official_order(bundled):
    classes, _, _ = COUNTS[bundled.name]
    assert len(bundled.names) == classes
    if bundled.name == "coco2014":
        assert bundled.names[:5] == ["person", "bicycle", "car", "motorcycle", "airplane"]
        assert bundled.names[-3:] == ["teddy bear", "hair drier", "toothbrush"]
    else:
        assert bundled.names == sorted(bundled.names)


def test_tree_sizes(bundled):
    _, fine, coarse = COUNTS[bundled.name]
    tree = bundled.hierarchy
    assert (len(tree.fine_names), len(tree.coarse_names)) == (fine, coarse)
    assert max(tree.fine_of_class.count(g) for g in range(fine)) <= 8


def test_coco_tree_is_the_authors():
    fine = {frozenset(m) for m in load_labelset("coco2014").hierarchy.to_dict()["fine"].values()}
    assert frozenset({"fork", "wine glass", "knife", "spoon", "bowl", "dining table", "bottle",
                      "cup"}) in fine
    assert frozenset({"laptop", "tv", "cell phone", "cat", "bed", "remote", "couch",
                      "book"}) in fine
    assert frozenset({"airplane"}) in fine


def test_corpus_passes_validation(bundled):
    report = validate_corpus(bundled.name, min_mean=100, min_per_class=30)
    assert report.passed, report.problems
    assert set(report.stats["by_kind"]) == {"appearance", "context", "cooccurrence"}


def test_corpus_is_rebuilt_from_the_raw_answers(bundled):
    lines = (bundled.folder / "sentences.jsonl").read_text(encoding="utf-8").splitlines()
    answers = [json.loads(line) for line in lines if line.strip()]
    samples, dropped = build_corpus(answers, LabelMatcher(bundled.classes), clip_token_count)
    stored = [json.loads(line) for line in bundled.corpus_path.read_text().splitlines()]
    assert not dropped
    assert [[s.sentence, list(s.labels), s.kind] for s in samples] == \
        [[r["sentence"], r["labels"], r["kind"]] for r in stored]


def test_offline_provider_rebuilds_a_bundled_set(tmp_path):
    summary = run_knowledge(KnowledgeConfig(labels="voc2007", out=tmp_path / "voc",
                                            cache_dir=tmp_path / "cache", progress=False))
    assert summary.requests == 0 and not summary.lacking
    assert summary.hierarchy.startswith("the label set's own tree")
    rebuilt = (tmp_path / "voc" / "corpus.jsonl").read_text()
    assert rebuilt == load_labelset("voc2007").corpus_path.read_text()
