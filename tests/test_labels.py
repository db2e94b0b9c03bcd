"""Which classes a sentence names (LabelMatcher), and building a corpus from raw answers."""

from __future__ import annotations

import stat

import pytest

from imfree.toolkit.corpus import build_corpus, clip_token_count, read_corpus, write_corpus
from imfree.toolkit.labels import ClassInfo, LabelMatcher, plural_forms

CLASSES = [
    ClassInfo("cat", "cat", ("kitten",)),
    ClassInfo("dog", "dog"),
    ClassInfo("person", "person", ("people", "man", "men", "woman", "child", "children")),
    ClassInfo("diningtable", "dining table"),
    ClassInfo("car", "car"),
    ClassInfo("bus", "bus"),
    ClassInfo("knife", "knife"),
    ClassInfo("bird", "bird"),
    ClassInfo("boat", "boat"),
]


@pytest.fixture(scope="module")
def matcher():
    return LabelMatcher(CLASSES)


# --- plural forms -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "phrase, plural",
    [
        ("dog", "dogs"),
        ("bus", "buses"),
        ("box", "boxes"),
        ("church", "churches"),
        ("dish", "dishes"),
        ("city", "cities"),
        ("knife", "knives"),
        ("wolf", "wolves"),
        ("dining table", "dining tables"),
        ("potted plant", "potted plants"),
    ],
)
def test_plural_forms(phrase, plural):
    assert plural in plural_forms(phrase)


def test_plural_of_vowel_y_keeps_the_y():
    assert plural_forms("boy") == {"boys"}


# --- matching -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "sentence, expected",
    [
        ("a cat on a mat", ["cat"]),
        ("Cats and DOGS in the yard", ["cat", "dog"]),
        ("The Dog's tail", ["dog"]),
        ("a sleepy kitten", ["cat"]),
    ],
)
def test_matches_names_synonyms_and_case(matcher, sentence, expected):
    assert matcher.match(sentence) == expected


@pytest.mark.parametrize(
    "sentence",
    ["a boy tries to catch the ball", "concatenate the strings", "a scattered carpet",
     "a busy street", "a woodpecker in a birdhouse"],
)
def test_names_inside_other_words_do_not_count(matcher, sentence):
    assert matcher.match(sentence) == []


@pytest.mark.parametrize(
    "sentence, expected",
    [
        ("two city buses", ["bus"]),
        ("three dogs", ["dog"]),
        ("knives on a board", ["knife"]),
        ("some people on a bench", ["person"]),
        ("two men and their children", ["person"]),
    ],
)
def test_plurals_and_irregular_synonyms(matcher, sentence, expected):
    assert matcher.match(sentence) == expected


@pytest.mark.parametrize(
    "sentence",
    ["a dining table with plates", "a dining-table with plates", "a Dining  Table",
     "two dining tables"],
)
def test_multi_word_names(matcher, sentence):
    assert matcher.match(sentence) == ["diningtable"]


def test_first_word_of_a_multi_word_name_alone_does_not_count(matcher):
    assert matcher.match("a dining room") == []


@pytest.mark.parametrize(
    "sentence",
    ["there are no dogs here", "a street without a car", "not a single cat in sight",
     "a road with no big red buses", "No people were around"],
)
def test_negated_mentions_do_not_count(matcher, sentence):
    assert matcher.match(sentence) == []


@pytest.mark.parametrize(
    "sentence, expected",
    [
        ("no dogs, but a cat", ["cat"]),
        ("no dogs here. A dog and a cat sit outside", ["cat", "dog"]),
        ("without a car; later a bus and a car pass", ["car", "bus"]),
    ],
)
def test_later_mentions_after_a_negation_still_count(matcher, sentence, expected):
    assert matcher.match(sentence) == expected


def test_negation_reaches_only_a_few_words(matcher):
    assert matcher.match("no lights were on inside the parked car") == ["car"]


@pytest.mark.parametrize(
    "sentence, expected",
    [
        ("a dog not far from a car", ["dog", "car"]),
        ("a boat with no sails near a bird", ["bird", "boat"]),
    ],
)
def test_negation_does_not_reach_past_a_preposition(matcher, sentence, expected):
    """The reach is for adjectives ("no big brown dogs"), not for a phrase that moves on."""
    assert matcher.match(sentence) == expected


@pytest.mark.parametrize(
    ("sentence", "expected"),
    [
        ("a hot dog on a paper plate", ["hot dog"]),
        ("a teddy bear propped on a pillow", ["teddy bear"]),
        ("the dog stares at a hot dog", ["dog", "hot dog"]),
        ("a brown bear sniffs a teddy bear", ["bear", "teddy bear"]),
    ],
)
def test_a_name_inside_another_class_name_is_not_a_mention(sentence, expected):
    matcher = LabelMatcher([
        ClassInfo("dog", "dog"), ClassInfo("bear", "bear"),
        ClassInfo("hot dog", "hot dog"), ClassInfo("teddy bear", "teddy bear"),
    ])
    assert matcher.match(sentence) == expected


def test_matches_are_in_class_order(matcher):
    assert matcher.match("a bus, a man and a cat") == ["cat", "person", "bus"]


# --- build_corpus -------------------------------------------------------------------


def build(answers):
    return build_corpus(answers, LabelMatcher(CLASSES), clip_token_count)


def answer(sentence, requested, kind="appearance"):
    return {"sentence": sentence, "requested": requested, "kind": kind}


def test_labels_are_requested_and_named_classes():
    samples, dropped = build([answer("a cat sleeps beside a dog and a man", ["dog"], "context")])
    assert len(samples) == 1 and not dropped
    sample = samples[0]
    assert sample.labels == ("cat", "dog", "person")
    assert sample.kind == "context"


def test_requested_class_named_only_by_synonym_is_kept():
    samples, _ = build([answer("a kitten on a sofa", ["cat"])])
    assert [s.labels for s in samples] == [("cat",)]


def test_requested_class_not_named_is_still_a_label_when_another_is():
    samples, _ = build([answer("a cat next to a car", ["cat", "bus"], "cooccurrence")])
    assert samples[0].labels == ("cat", "car", "bus")


def test_duplicates_are_dropped_ignoring_case_and_spaces():
    samples, dropped = build([
        answer("A cat on a mat.", ["cat"]),
        answer("a  cat on   a MAT.", ["cat"]),
        answer(" A cat on a mat. ", ["cat"]),
        answer("A dog on a mat.", ["dog"]),
    ])
    assert [s.sentence for s in samples] == ["A cat on a mat.", "A dog on a mat."]
    assert dropped == {"duplicate": 2}


def test_sentence_whitespace_is_normalised():
    samples, _ = build([answer("  a cat\n on a  mat ", ["cat"])])
    assert samples[0].sentence == "a cat on a mat"


def test_sentences_naming_none_of_their_requested_classes_are_dropped():
    samples, dropped = build([
        answer("a dog in a park", ["cat"]),
        answer("no cats in this park", ["cat"]),
        answer("a cat in a park", ["cat"]),
    ])
    assert [s.sentence for s in samples] == ["a cat in a park"]
    assert dropped == {"names none of its requested classes": 2}


def test_sentences_longer_than_the_context_are_dropped():
    fits = "a" + " cat" * 74  # 75 tokens + start + end = 77
    too_long = "a" + " cat" * 75
    assert clip_token_count(fits) == 75 and clip_token_count(too_long) == 76
    samples, dropped = build([answer(fits, ["cat"]), answer(too_long, ["cat"])])
    assert [s.sentence for s in samples] == [fits]
    assert dropped == {"longer than the text encoder's context": 1}


def test_dropped_sentence_does_not_block_a_later_valid_copy():
    samples, dropped = build([
        answer("a cat in a park", ["dog"]),
        answer("a cat in a park", ["cat"]),
    ])
    assert [s.labels for s in samples] == [("cat",)]
    assert dropped == {"names none of its requested classes": 1}


def test_counters_add_up():
    answers = [answer("a cat", ["cat"]), answer("a cat", ["cat"]), answer("a bus", ["dog"]),
               answer("a" + " dog" * 80, ["dog"]), answer("a dog", ["dog"])]
    samples, dropped = build(answers)
    assert len(samples) + sum(dropped.values()) == len(answers)
    assert len(samples) == 2


def test_written_corpus_reads_back(tmp_path):
    samples, _ = build([answer("a cat and a dog", ["cat"], "context"), answer("a bus", ["bus"])])
    path = tmp_path / "corpus.jsonl"
    write_corpus(path, samples)
    names = [c.name for c in CLASSES]
    assert read_corpus(path, names) == samples
    assert [p.name for p in tmp_path.iterdir()] == ["corpus.jsonl"]  # no temporary left


def test_written_corpus_is_as_readable_as_an_ordinary_file(tmp_path):
    """Written through a temporary file, it must still get the usual (umask) permissions."""
    reference = tmp_path / "ordinary.txt"
    reference.write_text("x")
    path = tmp_path / "corpus.jsonl"
    write_corpus(path, build([answer("a cat", ["cat"])])[0])
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)
